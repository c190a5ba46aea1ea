"""KVzip: query-agnostic scores from the attention the model pays to the context while repeating it."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvpress import hook
from kvpress.budgets import check_int
from kvpress.layer import PrunedLayer
from kvpress.policy import Policy, slots_for_budget
from kvpress.selection import rank_from_order
from kvpress.state import ScoreState

ROW_CHUNK = 256  # query rows per block when recomputing attention probabilities
# fp32 logits per block of the reconstruction's attention (8 MB: the block stays in a CPU's caches)
BLOCK_LOGITS = 1 << 21
# above every context score (a probability) and every later token's (1 + a probability)
TEMPLATE_PREFIX_SCORE = 3.0


__all__ = ["KVzip", "ReconstructionPrompt", "kvzip_prefill"]


@dataclass
class KVzip(Policy):
    """Score each slot by the largest attention it receives while the model reconstructs the context,
    then keep the top slots across layers and heads.

    Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
    arXiv 2505.23416. The context is the prompt without the chat template's prefix (its system turn and
    user header, BOS included), as in the authors' code, where that prefix is kept whole and never
    repeated. After the prompt is prefilled, the model is fed a repeat request followed by the context
    ("Repeat the previous context exactly." + the chat template's reply prefix + the context),
    teacher-forced, in chunks of `chunk_size` tokens (later chunks start with the last `overlap` tokens
    of the previous one), so memory stays linear. A slot's score is the maximum, over the chunk's query
    rows and the query heads of its KV group, of its softmax attention probability, the softmax taken
    over the template prefix and the sinks, the chunk's own slots and the repeated tokens (the
    reference's subsampling). The repeated tokens are then dropped. Scores do not depend on any
    question, so one compressed cache serves every later question.

    Run it with `kvzip_prefill(model, input_ids, cache, tokenizer)`; a cache that reaches its first
    decoding step without a reconstruction raises. Selection runs once every layer has been scored
    (the cross-layer stage): `allocation="global"` keeps the top `budget` share of all (layer, head,
    slot) scores of a row, so layers and heads keep different counts (the paper's default,
    non-uniform); `"layer"` gives each layer its uniform budget, shared by its heads (NVIDIA kvpress's
    `layerwise`). Tokens that come after the reconstructed prompt (a question, generated tokens) rank
    above every context slot, among themselves by `1 +` the largest attention they receive, so
    decode-time eviction takes the prompt's least reconstructed slots first [our choice]. The template
    prefix ranks above everything, so it is kept whole whenever the budget holds it (the authors keep it
    outside the budget). Defaults as NVIDIA kvpress's KVzipPress: 4 sinks kept, chunks of 2048 (the
    authors' code: 2000), overlap 8. State per layer: `scores [B, Hkv, P]` (the max attention).
    """

    spec_name = "kvzip"
    owns_prefill = True
    # its global allocation sets every layer's and head's count: AdaKV or PyramidKV around it broke the
    # budget (found by tests/test_fuzz_contract.py: 42 slots per row where 36 were allowed)
    sets_layer_counts = True
    sets_head_counts = True

    budget: int | float = 0.25
    sinks: int = 4
    allocation: str = "global"
    chunk_size: int = 2048
    overlap: int = 8
    allocates_across_layers: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.allocation not in ("global", "layer"):
            raise ValueError(f"KVzip: allocation must be 'global' or 'layer', got {self.allocation!r}")
        for name, low in (("chunk_size", 1), ("overlap", 0)):
            value = getattr(self, name)
            check_int("KVzip", name, value, low)
        if self.overlap >= self.chunk_size:
            raise ValueError(f"KVzip: overlap ({self.overlap}) must be smaller than chunk_size ({self.chunk_size})")

    def new_layer_state(self, layer) -> ReconstructionScores:
        return ReconstructionScores(torch.zeros(layer.batch, layer.num_heads, 0, device=layer.device))

    def prefill(self, model, input_ids, cache, *, tokenizer=None, attention_mask=None, prompt=None,
                context_start=None, logits_to_keep=0):
        """The declared prefill (`owns_prefill`): the prompt, then its reconstruction (`kvzip_prefill`)."""
        return reconstruct(self, model, input_ids, cache, tokenizer, attention_mask=attention_mask, prompt=prompt,
                           context_start=context_start, logits_to_keep=logits_to_keep)

    def update(self, layer, signals) -> None:
        state = layer.state(self)
        if not state.reconstructed:
            if not layer.context.shared.owner_prefill:
                raise ValueError(
                    "KVzip scores slots by context reconstruction, which needs extra forwards of the model: "
                    "prefill the prompt with cache.prefill(model, input_ids, tokenizer=tokenizer) (or "
                    "kvpress.policies.kvzip_prefill) before generate(), not with a plain forward or generate() "
                    "on an empty cache (docs/policies.md, KVzip).")
            return  # the prompt's own forward: its slots are scored by the reconstruction
        if signals.query is None:
            raise ValueError("KVzip needs the forward's queries (Signals.query)")
        module = signals.module
        softcap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
        scaling = float(getattr(module, "scaling", signals.query.shape[-1] ** -0.5))
        received = max_attention(signals.query, layer.keys, layer.valid, scaling, softcap)
        # after reconstruction: the context keeps its scores; later tokens rank above it, by attention
        late = layer.positions >= state.prompt_tokens[:, None, None]  # [B, Hkv, P]
        state.scores = torch.where(late, torch.maximum(state.scores, 1.0 + received), state.scores)

    def score(self, layer) -> torch.Tensor:
        state = layer.state(self)
        return torch.where(in_template_prefix(layer.positions, state), TEMPLATE_PREFIX_SCORE, state.scores)

    def allocate(self, layers) -> list[torch.Tensor]:
        if not all(layer.state(self).reconstructed for layer in layers):
            raise ValueError(
                "KVzip scores slots by context reconstruction, which needs extra forwards of the model: prefill "
                "with kvpress.policies.kvzip_prefill(model, input_ids, cache, tokenizer) instead of a plain "
                "forward or generate() on an empty cache (docs/policies.md, KVzip).")
        uniform = [slots_for_budget(layer.budget, layer.real_seen)[:, None].expand(-1, layer.num_heads)
                   for layer in layers]  # [B, Hkv] each
        groups = [list(range(len(layers)))] if self.allocation == "global" else [[i] for i in range(len(layers))]
        counts = [None] * len(layers)
        for group in groups:
            for index, chosen in zip(group, top_share([layers[i] for i in group], [uniform[i] for i in group],
                                                     self)):
                counts[index] = chosen
        return counts


def top_share(layers, uniform, policy) -> list[torch.Tensor]:
    """Per layer `[B, Hkv]` counts: each row keeps, over all heads of `layers`, the sum of `uniform` slots,
    protected slots first, then the highest scores (one ranking across the layers and heads)."""
    protected = [policy.protected(layer) & layer.valid for layer in layers]
    candidates = [layer.valid & ~p for layer, p in zip(layers, protected)]
    scores = torch.cat([torch.where(c, policy.score(layer).float(), float("-inf")).flatten(1)
                        for layer, c in zip(layers, candidates)], dim=1)  # [B, N]
    room = sum(u.sum(-1) for u in uniform) - sum(p.sum((1, 2)) for p in protected)  # [B]
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = rank_from_order(order, dim=1)
    chosen = (rank < room[:, None]) & torch.isfinite(scores)  # [B, N]
    counts, offset = [], 0
    for layer, p in zip(layers, protected):
        size = p.shape[1] * p.shape[2]
        picked = chosen[:, offset:offset + size].view_as(p)
        counts.append(picked.sum(-1) + p.sum(-1))
        offset += size
    return counts


def max_attention(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float,
                  softcap: float | None = None) -> torch.Tensor:
    """`[B, Hkv, P]` fp32: the largest softmax probability each slot gets from the `q` new queries
    (`query [B, Hq, q, D]`, the last `q` slots of `keys [B, Hkv, P, D]`), over rows and the query heads
    of its KV group. Row `i` sees the valid older slots and the new slots up to its own; rows of invalid
    (padding) new slots count for nothing. Scores the tokens that come after the reconstruction."""
    batch, q_heads, q, dim = query.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    queries = query.float().view(batch, kv_heads, group, q, dim)
    keys = keys.float()
    older = valid[..., :slots - q]
    best = torch.zeros(batch, kv_heads, slots, device=keys.device)
    new_index = torch.arange(q, device=keys.device)
    for start in range(0, q, ROW_CHUNK):
        stop = min(q, start + ROW_CHUNK)
        logits = torch.einsum("bhgqd,bhpd->bhgqp", queries[:, :, :, start:stop], keys) * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        causal = new_index[None, :] <= new_index[start:stop, None]  # [c, q]
        visible = torch.cat([older[:, :, None, :].expand(-1, -1, stop - start, -1),
                             causal[None, None] & valid[:, :, None, slots - q:]], dim=-1)  # [B, Hkv, c, P]
        probs = torch.softmax(logits.masked_fill(~visible[:, :, None], float("-inf")), dim=-1).nan_to_num(0.0)
        probs = probs * valid[:, :, None, slots - q + start:slots - q + stop, None]  # padding rows
        best = torch.maximum(best, probs.amax(dim=(2, 3)))
    return best


class ReconstructionScores(ScoreState):
    """KVzip's per-layer state: `scores [B, Hkv, P]` (largest attention received), `reconstructed` once
    `kvzip_prefill` scored the prompt, `prompt_tokens [B]` the real tokens it scored, `template_prefix
    [B, 2]` the positions `[start, stop)` of the row's chat-template prefix (empty without one)."""

    row_fields: ClassVar[tuple[str, ...]] = ("prompt_tokens", "template_prefix")

    def __init__(self, scores: torch.Tensor):
        super().__init__(scores)
        self.reconstructed = False
        self.prompt_tokens: torch.Tensor | None = None
        self.template_prefix: torch.Tensor | None = None


def in_template_prefix(positions: torch.Tensor, state: ReconstructionScores) -> torch.Tensor:
    """`[B, Hkv, P]` bool: which of `positions [B, Hkv, P]` hold the row's chat-template prefix."""
    if state.template_prefix is None:
        return torch.zeros_like(positions, dtype=torch.bool)
    start, stop = state.template_prefix[:, 0, None, None], state.template_prefix[:, 1, None, None]
    return (positions >= start) & (positions < stop)


@dataclass(frozen=True)
class ReconstructionPrompt:
    """Token ids of KVzip's repeat request: `first` before the first chunk, `later` before later chunks
    (followed by the previous chunk's last `overlap` tokens), then `reply` (the chat template's turn
    change up to the assistant's reply). `template_prefix`: the chat template's tokens before the user's
    message (system turn, user header); a prompt row that starts with them (and has more) keeps them
    whole and repeats only what follows."""

    first: list[int]
    later: list[int]
    reply: list[int] = field(default_factory=list)
    template_prefix: list[int] = field(default_factory=list)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ReconstructionPrompt:
        """The authors' wording (`model/wrapper.py`, `self_task`), and the tokenizer's chat template around
        one user message: what precedes it (`template_prefix`) and the reply prefix after it (`reply`;
        "\\n" and no prefix without a template). The template is rendered with `enable_thinking=False`, as
        the authors' Qwen3 template ends the reply prefix with an empty think block; templates that do not
        know the flag ignore it."""

        def encode(text):
            return tokenizer.encode(text, add_special_tokens=False)

        prefix, reply = "", "\n"
        if getattr(tokenizer, "chat_template", None):
            marker = "#" * 13
            text = tokenizer.apply_chat_template([{"role": "user", "content": marker + "dummy context\n" + marker}],
                                                 add_generation_prompt=True, tokenize=False, enable_thinking=False)
            prefix, _, reply = text.split(marker, 2)
        return cls(first=encode("\n\nRepeat the previous context exactly."),
                   later=encode("\n\nRepeat the part of the previous context exactly, starting with "),
                   reply=encode(reply), template_prefix=encode(prefix) if prefix else [])


@torch.no_grad()
def kvzip_prefill(model, input_ids: torch.Tensor, cache, tokenizer=None, *, attention_mask=None,
                  prompt: ReconstructionPrompt | None = None, context_start: int | None = None,
                  logits_to_keep: int = 0) -> torch.Tensor:
    """Prefill `input_ids [B, T]` into `cache` (a `PrunedCache` whose chain holds `KVzip`), score its
    slots by context reconstruction, and compress. Returns the prefill's logits: `[B, T, V]` by default,
    the last `logits_to_keep` positions' `[B, logits_to_keep, V]` when given (transformers' argument:
    `logits_to_keep=1` when only the next token is needed skips the LM head over the prompt).

    The repeat request comes from `tokenizer` (or `prompt`). Each row is reconstructed alone, chunk by
    chunk, against the prefilled cache, which is only read: the repeated tokens go to a throwaway cache
    (`ReconstructionCache`) and never enter `cache`. The context is a row's real tokens (left padding is
    skipped) after its first `context_start` ones; by default those are the chat template's prefix when
    the row starts with it (`ReconstructionPrompt.template_prefix`), none otherwise. Pass
    `context_start` for a prompt whose prefix the template does not produce by itself (a custom system
    prompt). Cost: one plain prefill, plus per row a forward over about `T + T/chunk_size *
    len(request)` tokens attending the cache (the reconstruction), whose attention also gives the
    scores (`attend_and_score`). To continue with `generate`, prefill all but the last prompt token,
    then pass the full ids: `kvzip_prefill(model, ids[:, :-1], cache, tok); model.generate(ids, cache=cache, ...)`.
    """
    if not any(isinstance(member, KVzip) for member in getattr(cache, "chain", ())):
        raise ValueError("kvzip_prefill needs a PrunedCache whose policy chain holds KVzip")
    return cache.prefill(model, input_ids, tokenizer=tokenizer, attention_mask=attention_mask, prompt=prompt,
                         context_start=context_start, logits_to_keep=logits_to_keep)


@torch.no_grad()
def reconstruct(policy: KVzip, model, input_ids: torch.Tensor, cache, tokenizer=None, *, attention_mask=None,
                prompt: ReconstructionPrompt | None = None, context_start: int | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
    """KVzip's prefill (its `prefill` hook, run by `PrunedCache.prefill`): `kvzip_prefill`'s work."""
    if prompt is None:
        if tokenizer is None:
            raise ValueError("kvzip_prefill needs the tokenizer (or a ReconstructionPrompt) for the repeat request")
        prompt = ReconstructionPrompt.from_tokenizer(tokenizer)
    real = input_ids.shape[1] if attention_mask is None else attention_mask.sum(-1)
    real = torch.as_tensor(real).expand(input_ids.shape[0])
    rows = [input_ids[row, input_ids.shape[1] - int(real[row]):] for row in range(input_ids.shape[0])]  # real tokens
    heads = template_lengths(rows, prompt.template_prefix, context_start)
    positions = None
    if attention_mask is not None:  # as generate does: real tokens count from 0 in every row
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + int(cache.get_seq_length())
    logits = model(input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                   use_cache=True, logits_to_keep=logits_to_keep).logits
    layers = cache.pruned_layers()
    prefix_stop = layers[0].real_seen.cpu() - torch.tensor([len(tokens) for tokens in rows]) + torch.tensor(heads)
    template_prefix = torch.stack([prefix_stop - torch.tensor(heads), prefix_stop], dim=-1)  # [B, 2] positions
    for layer in layers:
        layer.state(policy).template_prefix = template_prefix.to(layer.device)
    with contextlib.ExitStack() as opened:  # quantized storage dequantizes once for all the chunks
        for layer in layers:
            opened.enter_context(layer.slots.readable())
        for row in range(input_ids.shape[0]):
            context = rows[row][heads[row]:]  # what the model repeats
            first_position = int(prefix_stop[row])
            seen = int(layers[0].real_seen[row])
            for start in range(0, context.shape[0], policy.chunk_size):
                stop = min(context.shape[0], start + policy.chunk_size)
                request = prompt.first if start == 0 else prompt.later + context[start - policy.overlap:start].tolist()
                repeat = torch.cat([torch.tensor(request + prompt.reply, dtype=torch.long), context[start:stop].cpu()])
                scratch = ReconstructionCache(policy, cache, row, (first_position + start, first_position + stop))
                repeat_positions = torch.arange(seen, seen + repeat.shape[0])[None].to(input_ids.device)
                model(repeat[None].to(input_ids.device), cache=scratch, use_cache=True, position_ids=repeat_positions,
                      logits_to_keep=1)
    for layer in layers:
        layer.state(policy).reconstructed = True
        layer.state(policy).prompt_tokens = layer.real_seen.clone()
    cache.end_prefill()
    return logits


class RepeatedRow(DynamicLayer):
    """One pruned layer of a `ReconstructionCache`: views of row `row`'s prefilled keys and values in
    `layer` (never written), then the repeated tokens, concatenated after them into new tensors."""

    def __init__(self, layer: PrunedLayer, row: int):
        super().__init__()
        self.pruned, self.row = layer, row
        self.keys, self.values = layer.keys[row:row + 1], layer.values[row:row + 1]  # [1, Hkv, P, D]
        self.device = self.keys.device
        self.is_initialized = True


class ReconstructionCache(Cache):
    """A throwaway `transformers.Cache` for one reconstruction forward: row `row` of the prefilled
    `PrunedCache` `cache`, repeating the context positions `chunk = (start, stop)`.

    Its pruned layers are `RepeatedRow`s (the prefilled slots read in place, the repeated tokens after
    them); its other layers (transformers' own sliding layers of a hybrid model, at most a window
    each) are copies of the row's. The attention of a pruned layer comes to `attend` through kvpress's
    attention hook, by the handoff `PrunedCache` uses: it computes the layer's attention and the
    chunk's scores in one pass (`attend_and_score`) and folds the scores into `policy`'s state of the
    pruned layer. The cache is dropped after the forward, and the repeated tokens with it."""

    def __init__(self, policy: KVzip, cache, row: int, chunk: tuple[int, int]):
        layers = []
        for layer in cache.layers:
            if isinstance(layer, PrunedLayer):
                layers.append(RepeatedRow(layer, row))
            else:
                kept = copy.deepcopy(layer)
                kept.batch_select_indices(torch.tensor([row]))
                layers.append(kept)
        super().__init__(layers=layers)
        self.policy, self.row, self.chunk = policy, row, chunk

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        if isinstance(layer, RepeatedRow):
            hook.leave_handoff(hook.Handoff(self, 0, layer, keys))
        return keys, values

    def attend(self, layer: RepeatedRow, original, module, query, key, value, attention_mask, *args, **kwargs):
        """The attention of `layer` for the hook (`original` and the model's mask are not used: the
        visible slots are the row's valid ones, the window's when the layer slides, and the repeated
        tokens up to each query's own)."""
        pruned, row = layer.pruned, self.row
        state = pruned.state(self.policy)
        old = pruned.positions[row]  # [Hkv, P]
        start, stop = self.chunk
        prefix_start, prefix_stop = state.template_prefix[row]
        # the reference's subsample: sinks, template prefix, the chunk's slots (and the repeated tokens)
        allowed = (old < self.policy.sinks) | ((old >= start) & (old < stop)) | ((old >= prefix_start) & (old < prefix_stop))
        visible = pruned.valid[row]  # [Hkv, P]
        scaling = kwargs.get("scaling")
        window = kwargs.get("sliding_window")
        output, received = attend_and_score(
            query, key, value, visible, visible & allowed,
            scaling=query.shape[-1] ** -0.5 if scaling is None else scaling, softcap=kwargs.get("softcap"),
            window=window, positions=old if window is not None else None,
            first_position=int(pruned.real_seen[row]))
        state.scores[row] = torch.maximum(state.scores[row], received)
        return output, None


def attend_and_score(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                     scored: torch.Tensor, *, scaling: float, softcap: float | None = None,
                     window: int | None = None, positions: torch.Tensor | None = None,
                     first_position: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One reconstruction forward's attention for one row, and its KVzip scores, from the same logits.

    `query [1, Hq, q, D]` (RoPE applied), `keys [1, Hkv, P + q, D]` and `values [1, Hkv, P + q, Dv]`: the
    `P` prefilled slots then the `q` repeated tokens. Query `i` attends the `visible [Hkv, P]` slots and
    the repeated tokens up to its own (with `window`, only positions above its own minus the window:
    `positions [Hkv, P]` of the slots, the repeated tokens at `first_position + i`). Returns the
    attention output `[1, q, Hq, Dv]` (the query's dtype) and `[Hkv, P]` fp32 scores: per slot of
    `scored [Hkv, P]` (a subset of `visible`), the largest probability it gets over the rows and the
    query heads of its KV group, in the softmax over `scored` and the repeated tokens (the reference's
    subsample); 0 elsewhere. When `scored` is `visible` the one softmax serves both.

    Computed in fp32 in blocks of query rows (`BLOCK_LOGITS` logits each, so memory stays linear in
    `P + q`), each block only up to its last repeated token: the same maths as the model's attention
    and the recomputed probabilities, within fp32 rounding."""
    _, q_heads, q, dim = query.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    old, group = total - q, q_heads // kv_heads
    queries = (query[0].float() * scaling).view(kv_heads, group, q, dim)
    keys_t = keys[0].float().transpose(1, 2)  # [Hkv, D, P + q]
    values = values[0].float()  # [Hkv, P + q, Dv]
    output = queries.new_empty(kv_heads, group, q, values.shape[-1])
    best = queries.new_zeros(kv_heads, old)
    hidden = None if bool(visible.all()) else ~visible[:, None, None, :]  # [Hkv, 1, 1, P]
    columns = None
    if not torch.equal(scored, visible):  # several chunks: score over the subsample only
        columns = scored.any(0).nonzero().flatten()  # [C] (the heads' union)
        outside = ~scored[:, columns][:, None, None, :]  # [Hkv, 1, 1, C]
    if window is not None and first_position + q - 1 < window:
        window = None  # every position is inside it
    rows = max(16, BLOCK_LOGITS // (q_heads * total))
    for start in range(0, q, rows):
        stop = min(q, start + rows)
        count, width = stop - start, old + stop  # later repeated tokens are hidden from the whole block
        logits = torch.matmul(queries[:, :, start:stop].reshape(kv_heads, group * count, dim), keys_t[:, :, :width])
        logits = logits.view(kv_heads, group, count, width)
        if softcap is not None:
            logits.div_(softcap).tanh_().mul_(softcap)
        future = torch.ones(count, count, dtype=torch.bool, device=logits.device).triu(1)
        logits[..., old + start:].masked_fill_(future, float("-inf"))
        if hidden is not None:
            logits[..., :old].masked_fill_(hidden, float("-inf"))
        if window is not None:
            oldest = first_position + torch.arange(start, stop, device=logits.device) - window  # [c]
            new = first_position + torch.arange(stop, device=logits.device)
            logits[..., :old].masked_fill_(positions[:, None, None, :] <= oldest[:, None], float("-inf"))
            logits[..., old:].masked_fill_(new <= oldest[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        output[:, :, start:stop] = torch.matmul(probs.view(kv_heads, group * count, width),
                                                values[:, :width]).view(kv_heads, group, count, -1)
        if columns is None:
            best = torch.maximum(best, probs[..., :old].amax(dim=(1, 2)))
        else:
            subsample = torch.cat([logits[..., columns].masked_fill(outside, float("-inf")), logits[..., old:]], -1)
            received = torch.softmax(subsample, dim=-1)[..., :columns.shape[0]].amax(dim=(1, 2))
            best[:, columns] = torch.maximum(best[:, columns], received)
    output = output.view(q_heads, q, -1).transpose(0, 1).unsqueeze(0)  # [1, q, Hq, Dv]
    return output.to(query.dtype).contiguous(), best


def template_lengths(rows: list[torch.Tensor], template_prefix: list[int], context_start: int | None) -> list[int]:
    """Per row, how many leading tokens of `rows` (each a row's real tokens) precede the context:
    `context_start` when given, else the template prefix's length where the row starts with it."""
    shortest = min(len(tokens) for tokens in rows)
    if context_start is not None:
        if isinstance(context_start, bool) or not isinstance(context_start, int) or not 0 <= context_start < shortest:
            raise ValueError(f"kvzip_prefill: context_start (prompt tokens before the context, kept whole and not "
                             f"repeated) must be an int in [0, {shortest - 1}] for a prompt whose shortest row has "
                             f"{shortest} real tokens, got {context_start!r}")
        return [context_start] * len(rows)
    size = len(template_prefix)
    return [size if 0 < size < len(tokens) and tokens[:size].tolist() == template_prefix else 0 for tokens in rows]
