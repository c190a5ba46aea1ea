"""One instance of every registered policy, built from `kvpress.policies.REGISTRY` so that a new policy
is covered by the tests that use this helper without editing them."""

from __future__ import annotations

from kvpress.policies import REGISTRY, ReconstructionPrompt, SnapKV, SpAtten
from kvpress.policies.quantized_pruning import QuantizedPruning
from kvpress.policy import Wrapper


def make_policy(name: str, budget, *, never_evicts: bool = False):
    """`name` from the registry at `budget` (wrappers around SnapKV, which every wrapper accepts).
    With `never_evicts`, parameters that evict or prune whatever the budget (SpAtten's head pruning,
    QuantizedPruning's memory) are set so that nothing is dropped."""
    cls = REGISTRY[name]
    if issubclass(cls, QuantizedPruning):
        if never_evicts:  # full precision: the memory holds every token
            return cls(SnapKV(budget=budget, window=2, kernel=3), memory=1 << 30, per_layer=True, group_size=8)
        return cls(SnapKV(budget=budget, window=2, kernel=3), memory=2500, bits=4, per_layer=True, group_size=8)
    if issubclass(cls, Wrapper):
        return cls(SnapKV(budget=budget, window=2, kernel=3))
    if getattr(cls, "runs_decoder_layers", False):  # LazyLLM: prunes the computation, never the cache
        return cls(schedule=((1, 1.0 if never_evicts else (budget if isinstance(budget, float) else 0.5)),))
    if issubclass(cls, SpAtten) and never_evicts:
        return cls(budget=budget, window=2, head_keep=1.0)
    fields = {"budget": budget}
    if "window" in cls.__dataclass_fields__:
        fields["window"] = 2
    return cls(**fields)


# KVzip's scores need extra forwards of the model (context reconstruction): a prompt reaches its cache
# through `PrunedCache.prefill`, with this request for the tiny random-vocabulary models.
RECONSTRUCTION = ReconstructionPrompt(first=[5, 6, 7], later=[8, 9], reply=[10, 11])


def needs_reconstruction(cache) -> bool:
    return getattr(cache, "prefill_owner", None) is not None


def prefill(model, ids, cache, attention_mask=None):
    """Logits `[B, T, V]` of the prompt `ids`, prefilled into `cache` as its policy requires."""
    if needs_reconstruction(cache):
        return cache.prefill(model, ids, attention_mask=attention_mask, prompt=RECONSTRUCTION)
    return model(ids, attention_mask=attention_mask, cache=cache, use_cache=True).logits


def generate(model, ids, cache, attention_mask=None, **settings):
    """`model.generate` into `cache`; a KVzip chain first gets all but the last prompt token through
    `prefill` (copied for each beam), and generate continues from there."""
    if needs_reconstruction(cache):
        prefill(model, ids[:, :-1], cache, None if attention_mask is None else attention_mask[:, :-1])
        if settings.get("num_beams", 1) > 1:  # generate expands the prompt for beams, not a filled cache
            cache.batch_repeat_interleave(settings["num_beams"])
    return model.generate(ids, attention_mask=attention_mask, cache=cache, **settings)
