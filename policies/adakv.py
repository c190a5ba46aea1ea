"""AdaKV: head-adaptive budgets inside each layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.budgets import check_number
from kvpress.policy import Wrapper
from kvpress.selection import rank_from_order


@dataclass
class AdaKV(Wrapper):
    """Let the KV heads of a layer share their budget: one top-k over the candidate slots of all
    heads, so heads whose attention is concentrated give slots to heads whose attention is spread.

    Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
    LLM Inference", arXiv 2407.11550; KVCache-Factory / `FFY0/AdaKV`. With `C_h` the inner policy's
    slots for head `h` outside its protected ones (window, sinks), take the top `sum_h C_h` inner
    scores over the flattened `[Hkv, P]` candidates of the layer, count `n_h` per head, floor it:
    `n_h <- round(n_h (1 - floor) + floor * C_h)`, and let head `h` keep its top `n_h` plus its
    protected slots. While decoding, a head may hold fewer candidates than its `n_h` (earlier steps
    evicted in it while its share was small); what it cannot use goes to the best-ranked candidates
    of the other heads beyond their `n_h` [our choice: otherwise the layer's total shrinks step after
    step, 17% in 8 steps on a tiny model]. Default `floor = 0.2` (KVCache-Factory). The per-head counts differ; the slot
    layout is padded to `max_h` (the surplus is masked) while keys and values are stored per head
    (kvpress/ragged.py), so the bytes follow the slots kept. Sums over the heads are within `Hkv / 2` of
    the uniform total (rounding). Scores are compared across heads as the inner policy gives them
    (attention mass summed over each group: every head sums the same number of query rows).
    Score wrappers (VATP, CAOTE, GraphKV) go inside AdaKV, so its counts come from the scores it ranks by;
    the other order is refused when built.
    """

    spec_name = "adakv"
    sets_head_counts = True

    floor: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("AdaKV", "floor", self.floor, 0, 1)

    def keep_counts(self, layer) -> torch.Tensor:
        uniform = self.inner.keep_counts(layer)  # [B, Hkv]
        protected = self.protected(layer)
        candidates = self.eligible(layer) & ~protected  # [B, Hkv, P]
        fixed = protected.sum(dim=-1)  # [B, Hkv]
        free = (uniform - fixed).clamp(min=0)  # C_h
        batch, heads, slots = candidates.shape
        scores = self.inner.score(layer).float()
        ranked = torch.where(candidates, scores, torch.finfo(torch.float32).min).flatten(1)  # [B, Hkv*P]
        # ties go to the later slot, as in top_k_selection
        order = torch.argsort(ranked.flip(-1), dim=-1, descending=True, stable=True)
        rank = rank_from_order(order).flip(-1).view(batch, heads, slots)
        chosen = candidates & (rank < free.sum(dim=-1)[:, None, None])
        counts = chosen.sum(dim=-1).float()  # n_h, exact in fp32
        floored = torch.round(counts * (1 - self.floor) + self.floor * free.float()).long()
        capped = torch.minimum(floored, candidates.sum(dim=-1))
        # a head holding fewer candidates than its floored count (decoding evicted in it while its share
        # was small) leaves part of the row's total unused: it goes to the best candidates the other
        # heads do not keep, in the same layer-wide ranking (at prefill no head is short)
        spare = (floored - capped).sum(dim=-1)  # [B]
        by_rank = rank.argsort(dim=-1)  # [B, Hkv, P] slots of each head, best first
        within = torch.empty_like(rank).scatter_(-1, by_rank, torch.arange(slots, device=rank.device).expand_as(rank))
        left = candidates & (within >= capped[..., None])  # candidates beyond their head's count
        source = heads * slots - 1 - order  # [B, Hkv*P] flattened (head, slot) of each rank
        left_ranked = left.flatten(1).gather(-1, source)
        taken = left_ranked & (left_ranked.cumsum(dim=-1) <= spare[:, None])
        extra = torch.zeros_like(capped).scatter_add_(-1, source // slots, taken.long())
        return capped + extra + fixed

    def slot_bound(self, layer) -> int:
        # one head may take the budget of every head of its layer, on top of its protected slots
        return min(layer.seen, layer.num_heads * self.inner.slot_bound(layer) + self.protected_bound(layer))

    def row_bound(self, layer) -> int:
        # the heads share the uniform total: a head keeps n_h <= C_h chosen slots on average plus its
        # protected ones, so a row keeps at most max(inner count, protected) per head, plus half a
        # slot per head from rounding the floored counts
        per_head = max(self.inner.slot_bound(layer), self.protected_bound(layer))
        return min(layer.seen * layer.num_heads, layer.num_heads * (per_head + 1))

    def per_head_storage(self, layer) -> bool:
        return True

    def over_budget(self, layer, counts, slack) -> bool:
        """The layer's heads share their budget: compact when a row holds more than the uniform total
        plus `slack` per head."""
        held = layer.valid.sum(dim=(-1, -2))  # [B]
        allowed = self.inner.keep_counts(layer).sum(dim=-1) + slack * layer.num_heads
        return bool((held > allowed).any())
