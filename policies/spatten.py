"""SpAtten: cascade token and head pruning with scores shared across layers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvpress.budgets import check_number
from kvpress.policies._layer_schedule import linear_layer_counts
from kvpress.policy import AttentionRequest, Policy, Selection
from kvpress.selection import rank_from_order
from kvpress.state import State

NEVER = torch.iinfo(torch.long).max


class CascadeState(State):
    """What SpAtten remembers for one cache, shared by all its layers (indexed by real position); the
    cache owns it, so reset, beam reordering and batch selection cover it.

    tokens `[B, N + 1]` fp32: cumulative attention each token received, summed over heads, query rows,
    layers and steps (slot `N` collects padding). gone_from `[B, N + 1]` long: lowest pruned-layer
    index that evicted the token (`NEVER` if none); the token may not stay in any layer above it.
    heads `[B, Hkv]` fp32: cumulative L1 magnitude of each KV head's attention output (its query
    heads summed). dropped: per pruned-layer index, `[B, Hkv]` bool heads pruned from that layer on.
    """

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None
        self.gone_from: torch.Tensor | None = None
        self.heads: torch.Tensor | None = None
        self.dropped: dict[int, torch.Tensor] = {}

    row_fields = ("tokens", "gone_from", "heads")

    def map_tensors(self, fn) -> None:
        super().map_tensors(fn)
        self.dropped = {index: fn(heads) for index, heads in self.dropped.items()}

    @property
    def nbytes(self) -> int:
        return super().nbytes + sum(heads.nbytes for heads in self.dropped.values())

    def ensure(self, layer) -> None:
        """Grow the position-keyed tensors to the tokens seen; column `N` (the last) collects padding."""
        batch, heads = layer.valid.shape[:2]
        if self.tokens is None:
            device = layer.valid.device
            self.tokens = torch.zeros(batch, 1, device=device)
            self.gone_from = torch.full((batch, 1), NEVER, dtype=torch.long, device=device)
            self.heads = torch.zeros(batch, heads, device=device)
        # sized from the host-side count of tokens seen (padding included), so no sync
        have, need = self.tokens.shape[1], layer.seen + 1
        if need > have:  # the old padding column becomes a position column
            self.tokens = torch.cat([self.tokens[:, :have - 1], self.tokens.new_zeros(batch, need - have + 1)], 1)
            self.gone_from = torch.cat([self.gone_from[:, :have - 1],
                                        self.gone_from.new_full((batch, need - have + 1), NEVER)], 1)

    def slot_index(self, layer) -> torch.Tensor:
        """`[B, Hkv * P]` index into the position-keyed tensors (padding -> the last column)."""
        pad = self.tokens.shape[1] - 1
        return torch.where(layer.positions >= 0, layer.positions, pad).flatten(1)

    def absorb(self, layer, mass: torch.Tensor, output: torch.Tensor | None) -> None:
        mass = torch.where(layer.valid, mass, 0.0).flatten(1)  # this forward's attention, [B, Hkv*P]
        self.tokens.scatter_add_(1, self.slot_index(layer), mass)
        if output is not None:  # [B, q, Hq, D]
            per_query_head = output.float().abs().sum(dim=(1, 3))  # [B, Hq]
            self.heads += per_query_head.view(self.heads.shape[0], self.heads.shape[1], -1).sum(-1)

    def held_below(self, layer, index: int) -> torch.Tensor:
        """`[B, Hkv, P]`: the slot's token was not evicted from any lower layer."""
        return self.gone_from.gather(1, self.slot_index(layer)).view_as(layer.valid) > index

    def record_kept(self, layer, index: int) -> None:
        """After layer `index` compacted: every real token it no longer holds in any head is gone from
        it and every layer above (a token it had already lost, here or below, keeps its lower index)."""
        kept = torch.zeros_like(self.gone_from).scatter_reduce_(
            1, self.slot_index(layer), layer.valid.flatten(1).long(), "amax")  # [B, N + 1]
        column = torch.arange(kept.shape[1], device=kept.device)
        real = column[None, :] < layer.real_seen[:, None]
        gone = real & (kept == 0)
        self.gone_from = torch.where(gone, self.gone_from.clamp(max=index), self.gone_from)


@dataclass
class SpAtten(Policy):
    """Cascade token pruning and cascade head pruning on importance accumulated across layers and steps.

    Wang, Zhang and Han, "SpAtten: Efficient Sparse Attention Architecture with Cascade Token and Head
    Pruning", arXiv 2012.09852. Token score `s_t += sum_h sum_q A^(l)[h, q, t]` after every layer and
    every decoding step, one score per token shared by all layers. Layer `l` keeps the top `k_l`
    tokens, `k_l` non-increasing with depth, and a token pruned at layer `l` never returns: it is
    evicted from every layer above too ("cascade"). Head score `s_h += sum_{t,d} |O^(l)[h, t, d]|`
    (magnitude of the head's attention output) over layers and steps; at layer `l` the least important
    heads are pruned for that layer and all above, cascaded the same way.

    Mapping onto a KV cache [our choice, docs/policies.md]: token pruning is eviction of the token's
    key and value, the same tokens in every KV head of a layer. Hidden states of pruned prompt tokens
    still pass the layers of the prefill forward (SpAtten would skip them: a compute saving, not a
    cache one). Head pruning acts on KV heads (with GQA a KV head and its query heads go together,
    scored by the sum of its query heads' output magnitudes): a pruned head's slots are invalidated
    and zeroed, later tokens are not stored in it and its query heads output zeros
    (`SlotStore.switch_off_heads`). Heads are pruned when a layer first compacts (end of prefill) and stay
    pruned. Progressive quantization (attention from the MSBs of Q/K, LSBs fetched only for flat
    softmax rows) and local value pruning save DRAM traffic, not cache contents: they are not part of
    this policy; the cache-size side of quantization is the library's KV quantization.

    Schedules [the paper tunes them per task]: `budget` is the mean per layer; with `token_beta > 1`
    layer budgets decrease linearly (PyramidKV's schedule: the last layer keeps `budget / token_beta`
    outside the window, the first `2 budget - budget / token_beta`, capped by the tokens seen). Heads:
    with `head_keep < 1` every layer keeps all KV heads up to the middle of the stack, then the kept
    count falls linearly to `ceil(head_keep * Hkv)` at the last layer. Defaults `token_beta=1`,
    `head_keep=1` (the same budget in every layer, no head pruning) follow the authors' LLM release
    (mit-han-lab/spatten-llm, KV token pruning only): the paper prunes heads of multi-head models
    (BERT, GPT-2), where one head is one query and its own keys and values, and the authors' released
    GPT-2-medium workload prunes at most 6 of 16 heads (last two layers); a GQA KV head is a whole group of query heads (SmolLM2: a third of the layer),
    and dropping one there made SpAtten worse than random eviction (docs/policies.md). A recent
    window of 16 is kept (as H2O in this library), so a new token is not evicted before it can
    accumulate attention. State: `CascadeState`, one per cache, owned by the cache (kvpress/state.py).
    """

    spec_name = "spatten"
    sets_layer_counts = True
    same_tokens_in_every_head = True

    budget: int | float = 0.25
    window: int = 16
    token_beta: float = 1.0
    head_keep: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("SpAtten", "token_beta", self.token_beta, 1)
        check_number("SpAtten", "head_keep", self.head_keep, 0, 1, open_low=True)

    def request(self, phase: str) -> AttentionRequest:
        return AttentionRequest(rows=None, accumulate=False)  # this forward's mass; the sum lives in the state

    def new_shared_state(self, layer) -> CascadeState:
        return CascadeState()

    def heads_kept(self, heads: int, index: int, count: int) -> int:
        """KV heads kept by pruned layer `index` of `count`: all up to the middle, then linearly fewer."""
        fewest = max(1, math.ceil(self.head_keep * heads))
        middle = (count - 1) / 2
        if count == 1 or index <= middle:
            return heads
        return heads - round((heads - fewest) * (index - middle) / (count - 1 - middle))

    def score(self, layer) -> torch.Tensor:
        state = layer.shared_state(self)
        return state.tokens.gather(1, state.slot_index(layer)).view_as(layer.valid)

    def keep_counts(self, layer) -> torch.Tensor:
        index, count = layer.context.pruned_index, layer.context.pruned_count
        mean = super().keep_counts(layer)  # [B, Hkv]
        window = mean.clamp(max=self.window)
        per_layer = linear_layer_counts(mean - window, layer.real_seen[:, None] - window, index, count,
                                        float(self.token_beta)) + window
        dropped = layer.shared_state(self).dropped.get(index)
        return per_layer if dropped is None else per_layer.masked_fill(dropped, 0)

    def prune_heads(self, layer, state: CascadeState, index: int, count: int) -> torch.Tensor:
        """`[B, Hkv]` heads pruned from layer `index` on: those below it plus the least important."""
        if index not in state.dropped:
            heads = layer.num_heads
            below = state.dropped.get(index - 1, torch.zeros_like(state.heads, dtype=torch.bool))
            keep = min(self.heads_kept(heads, index, count), heads - int(below.sum(-1).max()))
            ranked = state.heads.masked_fill(below, -math.inf)
            order = ranked.argsort(dim=-1, descending=True, stable=True)  # [B, Hkv]
            rank = rank_from_order(order)
            state.dropped[index] = below | (rank >= keep)
        return state.dropped[index]

    def update(self, layer, signals) -> None:
        """Add this forward's attention to the cross-layer token and head scores; at a layer's first
        eviction, prune its least important heads (and those pruned below it)."""
        super().update(layer, signals)
        state = layer.shared_state(self)
        state.ensure(layer)
        state.absorb(layer, self.raw_scores(layer), signals.output)
        index, count = layer.context.pruned_index, layer.context.pruned_count
        if self.evicts_during(signals.phase) and index not in state.dropped:  # once per layer: its first eviction
            dropped = self.prune_heads(layer, state, index, count)
            if bool(dropped.any()):
                layer.switch_off_heads(dropped)

    def slot_bound(self, layer) -> int:
        return min(layer.seen, 2 * super().slot_bound(layer) + self.window)  # the linear schedule's first layer

    def per_head_storage(self, layer) -> bool:
        return layer.heads_off is not None  # a switched-off head holds no storage

    def eligible(self, layer) -> torch.Tensor:
        """A token evicted from a lower layer may not stay in this one (the cascade)."""
        index = layer.context.pruned_index
        return layer.valid & layer.shared_state(self).held_below(layer, index)

    def compacted(self, layer, selection: Selection) -> None:
        index = layer.context.pruned_index
        layer.shared_state(self).record_kept(layer, index)
