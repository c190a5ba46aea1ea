"""KVCompose: composite tokens ranked across every layer, one global budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.budgets import check_bool, check_int
from kvpress.policy import DECODE, PREFILL, AttentionRequest, Policy, slots_for_budget
from kvpress.selection import rank_from_order

AGGREGATIONS = ("mean", "max")
ROW_CHUNK_ELEMENTS = 1 << 24  # fp32 probabilities held at once by `task_row_max`


@dataclass
class KVCompose(Policy):
    """Composite tokens ranked across every layer at once: informative layers keep more slots.

    The total stays the uniform budget summed over layers. "KVCompose: Efficient Structured KV Cache
    Compression with Composite Tokens", arXiv 2509.05165; reference code NVIDIA kvpress
    `presses/kvcompose_press.py`.

    Token score `s[l, g, j]`: the attention the task queries pay to slot `j` in layer `l`, KV head `g`.
    The task queries are the prompt's last `window` rows (the question when the prompt ends with it,
    like SnapKV's observation window) [our choice: the reference re-runs the question as a second
    forward with eager attention]. `agg_task="max"` (the reference's default): each query head's
    largest attention probability over the task rows, then the mean over the query heads of the
    group (`agg_group="mean"`, the reference's default): `s[g, j] = mean_{h in g} max_r A[h, r, j]`,
    computed from the forward's queries over the task rows only. `agg_task="mean"`: the attention
    signal summed over the task rows and the query heads of the group, which ranks as the reference's
    `agg_task="mean"` (a constant factor `window * G`, the same in every layer).
    `add_v_norm` multiplies by `||v_j||_2`; `add_mean_across_heads` adds the layer's mean over KV
    heads of the same token (default on, as the reference).

    Composite tokens: sort each head's candidate scores (slots outside the protected window)
    descending; the `i`-th composite token of layer `l` holds each head's `i`-th best token
    (different positions per head) and scores `c[l, i] = agg_head_g sorted_s[l, g, i]`. Global
    allocation, per batch row: the top `sum_l (C_l - window)` composite tokens over every layer,
    with `C_l` the uniform keep count; layer `l` keeps `n_l` composite tokens (each head its own top
    `n_l`) plus the window. `structured=False` is the unstructured variant: one top-k over
    `(layer, head, rank)`, so heads keep different counts. As in the reference, the first
    `keep_token_lower_bound` composite tokens of every layer (every head, unstructured) are always
    kept (none by default: a layer may keep the window alone), and with `first_layer_max` the
    structured variant gives layer 0 the maximum curve over layers.

    Runs in the cross-layer stage (`allocates_across_layers`): at the end of the prompt, once every
    layer has attended it. Decode rule [our choice, docs/policies.md]: each layer keeps the size it
    was given (a float budget grows it by the uniform growth); each decoding step adds its attention
    row to the running score (`"max"`: the running maximum of the group mean of the row's
    probabilities; `"mean"`: the running sum) and the layer evicts its lowest-scoring slots per head,
    the newest `window` tokens protected. State: the running score per slot (`ScoreState`).
    Defaults: the reference's (`structured`, `agg_task="max"`, `agg_head="mean"`, no value norm, head
    mean added, no lower bound); window 32 and budget 0.2 [our choice].
    """

    spec_name = "kvcompose"
    sets_layer_counts = True
    sets_head_counts = True

    budget: int | float = 0.2
    window: int = 32
    structured: bool = True
    agg_task: str = "max"
    agg_head: str = "mean"
    add_v_norm: bool = False
    add_mean_across_heads: bool = True
    keep_token_lower_bound: int = 0
    first_layer_max: bool = True

    allocates_across_layers = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ValueError(f"KVCompose: window must be an int >= 1 (the task query rows), got {self.window}")
        if self.agg_task not in AGGREGATIONS:
            raise ValueError(f"KVCompose: agg_task must be one of {AGGREGATIONS}, got {self.agg_task!r}")
        if self.agg_head not in AGGREGATIONS:
            raise ValueError(f"KVCompose: agg_head must be one of {AGGREGATIONS}, got {self.agg_head!r}")
        for name in ("structured", "add_v_norm", "add_mean_across_heads", "first_layer_max"):
            check_bool("KVCompose", name, getattr(self, name))
        check_int("KVCompose", "keep_token_lower_bound", self.keep_token_lower_bound, 0)

    def request(self, phase: str) -> AttentionRequest:
        if phase == DECODE:
            return AttentionRequest(rows=None, accumulate=self.agg_task == "mean")
        # "max" reads the queries (`update`); the window request keeps the attention path's checks
        # (masks, padding) and costs the window rows only
        return AttentionRequest(rows=self.window, accumulate=False)

    def update(self, layer, signals) -> None:
        if self.agg_task == "mean":
            return super().update(layer, signals)
        state = layer.state(self)
        if signals.phase == PREFILL:
            module = signals.module
            softcap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
            scaling = float(getattr(module, "scaling", signals.query.shape[-1] ** -0.5))
            state.scores = task_row_max(signals.query, layer.keys, layer.valid, self.window, scaling, softcap,
                                        layer.positions, layer.sliding_window)
        elif signals.mass is not None:  # one decoding row: its probabilities averaged over the group
            group = signals.query.shape[1] // layer.num_heads
            state.scores = torch.maximum(state.scores, signals.mass / group)

    def score(self, layer) -> torch.Tensor:
        scores = self.raw_scores(layer).float()  # [B, Hkv, P]
        if self.add_v_norm:
            scores = scores * layer.values.float().norm(dim=-1)
        if self.add_mean_across_heads:
            scores = scores + head_mean_by_position(scores, layer.positions, layer.valid, layer.seen)
        return scores

    def allocate(self, layers) -> list[torch.Tensor]:
        chain = layers[0].context.policy  # the outermost policy: its protection and eligibility
        pieces = [self.candidates(layer, chain) for layer in layers]
        widest = max(sorted_scores.shape[-1] for sorted_scores, _, _ in pieces)
        lowest = torch.finfo(torch.float32).min
        ranked = torch.stack([torch.nn.functional.pad(s, (0, widest - s.shape[-1]), value=lowest)
                              for s, _, _ in pieces], dim=1)  # [B, L, Hkv, W]
        free = torch.stack([f for _, f, _ in pieces], dim=1)  # [B, L, Hkv]
        fixed = [k for _, _, k in pieces]
        if self.structured:
            composite = composite_scores(ranked, self.agg_head)  # [B, L, W]
            if self.first_layer_max:
                composite[:, 0] = torch.where(composite[:, 0] > lowest, composite.amax(dim=1), lowest)
            total = (free.sum(-1) // free.shape[-1]).sum(-1)  # [B] composite tokens
            kept = global_top_counts(composite, total, self.forced_ranks())  # [B, L]
            kept = kept[..., None].expand_as(free)
        else:
            kept = global_top_counts(ranked.flatten(1, 2), free.sum(dim=(1, 2)), self.forced_ranks())
            kept = kept.view_as(free)
        available = (ranked > lowest).sum(-1)  # [B, L, Hkv] candidates per head
        counts = torch.minimum(kept, available)
        return [counts[:, index] + fixed[index] for index in range(len(layers))]

    def per_head_storage(self, layer) -> bool:
        return not self.structured  # the unstructured variant gives each head its own count

    def forced_ranks(self) -> int:
        return self.keep_token_lower_bound

    def candidates(self, layer, chain):
        """Per head of `layer`: candidate scores sorted descending (`-max` fp32 where none), the free
        slots `[B, Hkv]` (uniform keep count minus protected slots) and the protected slots kept
        `[B, Hkv]` (at most the uniform count)."""
        eligible = chain.eligible(layer)
        protected = chain.protected(layer) & eligible
        candidate = eligible & ~protected  # [B, Hkv, P]
        uniform = slots_for_budget(layer.budget, layer.real_seen)[:, None]  # [B, 1]
        fixed = torch.minimum(protected.sum(-1), uniform)  # [B, Hkv]: a budget under the window keeps its newest
        free = uniform - fixed
        lowest = torch.finfo(torch.float32).min
        scores = self.score(layer).float().clamp(min=lowest / 2).masked_fill(~candidate, lowest)
        return scores.sort(dim=-1, descending=True, stable=True).values, free, fixed


def task_row_max(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, rows: int, scaling: float,
                 softcap: float | None, positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """`[B, Hkv, P]` fp32: for each slot, the mean over the query heads of its KV group of the largest
    softmax probability the slot gets from one of the last `rows` query rows (`query [B, Hq, q, D]`,
    the last `q` slots of `keys [B, Hkv, P, D]`): the reference's `agg_task="max"`, `agg_group="mean"`.
    Row `i` sees the valid slots up to its own (and, with a sliding `window`, positions within it);
    padding rows count for nothing."""
    batch, q_heads, q, dim = query.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    rows = min(rows, q)
    queries = query[:, :, q - rows:].float().view(batch, kv_heads, group, rows, dim)
    keys = keys.float()
    row_slot = torch.arange(slots - rows, slots, device=keys.device)  # [rows]
    visible = valid[:, :, None, :] & (torch.arange(slots, device=keys.device) <= row_slot[:, None])  # [B, Hkv, rows, P]
    if window is not None:
        visible = visible & (positions[:, :, None, :] > positions[:, :, row_slot, None] - window)
    row_real = valid[:, :, row_slot]  # [B, Hkv, rows]
    best = torch.zeros(batch, kv_heads, group, slots, device=keys.device)
    chunk = max(1, ROW_CHUNK_ELEMENTS // max(1, batch * q_heads * slots))
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        logits = torch.einsum("bhgqd,bhpd->bhgqp", queries[:, :, :, start:stop], keys) * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        logits = logits.masked_fill(~visible[:, :, None, start:stop], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0) * row_real[:, :, None, start:stop, None]
        best = torch.maximum(best, probs.amax(dim=3))
    return best.mean(2)


def head_mean_by_position(scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                          seen: int) -> torch.Tensor:
    """`[B, Hkv, P]`: for each slot, the mean over the layer's KV heads of the score of the same token
    (heads not holding it count as 0). Slots of different heads hold different tokens once heads
    evicted differently, so the mean is taken by position, not by slot index."""
    batch, heads, _ = scores.shape
    index = torch.where(valid & (positions >= 0), positions, seen).flatten(1)  # padding -> bucket `seen`
    total = scores.new_zeros(batch, seen + 1).scatter_add_(1, index, scores.masked_fill(~valid, 0.0).flatten(1))
    return (total / heads).gather(1, index).view_as(scores)


def composite_scores(ranked: torch.Tensor, agg: str) -> torch.Tensor:
    """`[B, L, Hkv, W]` per-head sorted scores -> `[B, L, W]` composite scores: `agg` over the heads
    that hold an `i`-th candidate; `-max` fp32 where no head does."""
    lowest = torch.finfo(torch.float32).min
    present = ranked > lowest
    if agg == "max":
        return ranked.amax(dim=2)
    count = present.sum(2)
    mean = ranked.masked_fill(~present, 0.0).sum(2) / count.clamp(min=1)
    return torch.where(count > 0, mean, lowest)


def global_top_counts(scores: torch.Tensor, total: torch.Tensor, forced: int) -> torch.Tensor:
    """Per batch row, the top `total[b]` entries of `scores [B, N, W]` (each of the `N` groups sorted
    descending along `W`, `-max` fp32 for no entry), the first `forced` of every group first; returns
    `[B, N]` how many of each group were taken. Ties go to the earlier group (deterministic)."""
    lowest = torch.finfo(torch.float32).min
    batch, groups, width = scores.shape
    present = scores > lowest
    lead = present & (torch.arange(width, device=scores.device) < forced)
    ranked = torch.where(lead, torch.inf, scores).flatten(1)  # [B, N * W]
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    rank = rank_from_order(order)
    chosen = (rank < total[:, None]).view(batch, groups, width) & present
    return chosen.sum(-1)
