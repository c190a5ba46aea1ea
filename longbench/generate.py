"""One greedy generation per sample, with a fresh cache, as the official ``pred.py`` runs it.

Batch size 1, ``do_sample=False``, ``num_beams=1``, the task's ``max_new_tokens``; the generation
config's EOS stops every task except SAMSum, which stops on ``[tokenizer.eos_token_id, newline id]``
exactly as the official code (not on the generation config's list) and may not stop on its first
token (``min_length = prompt + 1``). Only the new tokens are decoded (special tokens skipped, no
stripping).

Question-agnostic compression (``context_end``): the context prefix is prefilled alone, so the policy
evicts at the end of that forward without having seen the question; ``generate`` then gets the whole
prompt with the same cache and feeds only the uncached tail (question, answer cue, chat tags) in one
forward. Evicted context tokens are gone for good; the cache's budget keeps applying to everything it
has seen, so the policy may evict again at the end of the tail (every policy of this library keeps
its budget at every step), choosing among the context it kept and the tail.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

SEED = 42


@dataclass(frozen=True)
class GenerationSettings:
    """Per-task generation limits and stop rules."""

    max_new_tokens: int
    stop_at_newline: bool = False
    min_new_tokens: int = 0


@dataclass(frozen=True)
class CacheStats:
    """What the cache held at the end of the sample: mean slots per (layer, KV head), tokens seen per
    layer, bytes of keys and values (plus slot metadata for a PrunedCache), and the key/value bytes
    transformers' `DynamicCache` holds for the same tokens (`CacheReport.dynamic_bytes`: computed from
    the tokens seen and the model's shape; a transformers cache's own bytes)."""

    slots_kept: float
    tokens_seen: float
    bytes: int
    dynamic_bytes: int


def cache_stats(cache) -> CacheStats | None:
    """Statistics from ``cache.report()`` (PrunedCache) or from the tensors of a transformers cache."""
    if cache is None:
        return None
    if hasattr(cache, "report"):
        rep = cache.report()
        layers = list(rep.layers)
        if not layers:
            return None
        kept = sum(row.kept for row in layers) / len(layers)
        seen = sum(row.seen for row in layers) / len(layers)
        return CacheStats(float(kept), float(seen), int(rep.total_bytes), int(rep.dynamic_bytes))
    layers = [layer for layer in getattr(cache, "layers", []) if getattr(layer, "keys", None) is not None]
    if not layers:
        return None
    slots = [layer.keys.shape[-2] for layer in layers]
    nbytes = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    mean = sum(slots) / len(slots)
    return CacheStats(float(mean), float(mean), int(nbytes), int(nbytes))


def stop_token_ids(model, tokenizer, stop_at_newline: bool) -> list[int] | None:
    """The EOS ids of the generation config; for the newline-stopped task (SAMSum), exactly the
    official ``[tokenizer.eos_token_id, tokenizer.encode("\\n", add_special_tokens=False)[-1]]``."""
    if stop_at_newline:
        newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
        return [i for i in (tokenizer.eos_token_id, newline) if i is not None]
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return ids or None


@dataclass(frozen=True)
class Generation:
    """A decoded prediction with its token count, wall time and cache statistics."""

    text: str
    new_tokens: int
    seconds: float
    cache: CacheStats | None


def owns_prefill(cache) -> bool:
    """Whether the cache's policy owns its prefill (`owns_prefill`: KVzip's context reconstruction): its
    prompt must go in through `cache.prefill`, not a plain forward."""
    return getattr(cache, "prefill_owner", None) is not None


def prefill_context(model, ids: torch.Tensor, context_end: int, cache, tokenizer=None) -> None:
    """Feed ``ids[:, :context_end]`` in one forward; the policy evicts at its end (a policy that owns
    its prefill runs its own: KVzip's reconstruction forwards, which need the ``tokenizer``)."""
    if owns_prefill(cache):
        cache.prefill(model, ids[:, :context_end], tokenizer=tokenizer, logits_to_keep=1)
        return
    model(input_ids=ids[:, :context_end], cache=cache, use_cache=True, logits_to_keep=1)


@torch.inference_mode()
def generate(model, tokenizer, input_ids: list[int], settings: GenerationSettings,
             make_cache: Callable[[], object] | None = None, context_end: int | None = None) -> Generation:
    """Greedy-decode one prompt with a fresh cache from ``make_cache`` (None: transformers' default).
    With ``context_end``, ``input_ids[:context_end]`` is prefilled and compressed before the rest is
    seen (question-agnostic compression). A cache whose policy owns its prefill (KVzip) is prefilled
    with `cache.prefill` (all but the last prompt token without ``context_end``), so its prefill time includes the reconstruction."""
    torch.manual_seed(SEED)
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    cache = make_cache() if make_cache is not None else None
    if context_end is not None and cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {
        "attention_mask": torch.ones_like(ids), "max_new_tokens": settings.max_new_tokens, "do_sample": False,
        "num_beams": 1, "eos_token_id": stop_token_ids(model, tokenizer, settings.stop_at_newline),
        "pad_token_id": pad, "temperature": None, "top_p": None, "top_k": None,
    }
    if settings.min_new_tokens:
        kwargs["min_new_tokens"] = settings.min_new_tokens
    if cache is not None:
        kwargs["cache"] = cache
    start = time.perf_counter()
    if context_end is None and owns_prefill(cache):
        context_end = ids.shape[1] - 1  # the whole prompt is compressed; generate feeds its last token
    if context_end is not None:
        prefill_context(model, ids, context_end, cache, tokenizer)
    out = model.generate(ids, **kwargs)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Generation(text, len(new), seconds, cache_stats(cache))
