"""AdaKV: head-adaptive budgets inside each layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.policy import Wrapper


@dataclass
class AdaKV(Wrapper):
    """Let the KV heads of a layer share their budget: one top-k over the candidate slots of all
    heads, so heads whose attention is concentrated give slots to heads whose attention is spread.

    Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
    LLM Inference", arXiv 2407.11550; KVCache-Factory / `FFY0/AdaKV`. With `C_h` the inner policy's
    slots for head `h` outside its protected ones (window, sinks), take the top `sum_h C_h` inner
    scores over the flattened `[Hkv, P]` candidates of the layer, count `n_h` per head, floor it:
    `n_h <- round(n_h (1 - floor) + floor * C_h)`, and let head `h` keep its top `n_h` plus its
    protected slots. Default `floor = 0.2` (KVCache-Factory). The per-head counts differ; the cache
    keeps `max_h` slots per head and masks the surplus. Sums over the heads are within `Hkv / 2` of
    the uniform total (rounding). Scores are compared across heads as the inner policy gives them
    (attention mass summed over each group: every head sums the same number of query rows).
    Score wrappers (VATP, CAOTE, GraphKV) go inside AdaKV, so its counts come from the scores it ranks by;
    the other order is refused when built.
    """

    floor: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.floor, bool) or not isinstance(self.floor, (int, float)) or not 0 <= self.floor <= 1:
            raise ValueError(f"AdaKV: floor must be a float in [0, 1], got {self.floor!r}")

    def refuse(self, inner):
        from kvpress.policies.kvcompose import KVCompose
        from kvpress.policies.paged_eviction import PagedEviction
        from kvpress.policies.spatten import SpAtten

        if isinstance(inner, SpAtten):
            return "SpAtten prunes the same tokens in every head of a layer, so per-head budgets do not apply; use spatten alone"
        if isinstance(inner, AdaKV):
            return "AdaKV appears twice; use one adakv(...)"
        if isinstance(inner, KVCompose):
            return ("KVCompose chooses its per-layer and per-head counts by one global ranking; use kvcompose alone "
                    "(structured=false gives each head its own count)")
        if isinstance(inner, PagedEviction):
            return "PagedEviction evicts the same whole blocks in every KV head; use pagedeviction alone"
        return None

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
        positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(-1, order, positions)
        rank = rank.flip(-1).view(batch, heads, slots)
        chosen = candidates & (rank < free.sum(dim=-1)[:, None, None])
        counts = chosen.sum(dim=-1).float()  # n_h, exact in fp32
        floored = torch.round(counts * (1 - self.floor) + self.floor * free.float()).long()
        return torch.minimum(floored, candidates.sum(dim=-1)) + fixed

    def slot_bound(self, layer) -> int:
        # one head may take the budget of every head of its layer
        return min(layer.seen, layer.num_heads * self.inner.slot_bound(layer))

    def over_budget(self, layer, counts, slack) -> bool:
        """The layer's heads share their budget: compact when a row holds more than the uniform total
        plus `slack` per head."""
        held = layer.valid.sum(dim=(-1, -2))  # [B]
        allowed = self.inner.keep_counts(layer).sum(dim=-1) + slack * layer.num_heads
        return bool((held > allowed).any())
