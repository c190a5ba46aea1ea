"""GraphKV: lower the scores of tokens similar to the ones already chosen."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvpress.budgets import check_int
from kvpress.policies._nonnegative_scores import shift_nonnegative
from kvpress.policy import Wrapper
from kvpress.selection import top_k_later_first


@dataclass
class GraphKV(Wrapper):
    """Decay-signal propagation over a key-similarity graph, on top of any policy's scores, so the
    kept slots cover more distinct content instead of many near-duplicates.

    Li et al., "GraphKV: Breaking the Static Selection Paradigm with Graph-Based KV Cache Eviction",
    arXiv 2509.00388. Per layer and KV head, nodes are the candidate slots (valid, not protected by
    the inner policy), edges `e_ij = max(cos(k_i, k_j), 0)` (post-RoPE cached keys, no self-edges).
    Loop [our choice; the paper's figure only]: for `rounds` rounds, take the `seeds` highest-scoring
    candidates not yet seeds; each seed picks its `neighbours` most similar non-seed candidates, and
    each picked node `j` is decayed `S_j <- S_j - sum_i e_ij * S_j` over the seeds `i` of this round
    that picked it (it may go negative). The cache then keeps the inner budget's top slots by the
    updated score. Cost `O(rounds * seeds * P * d)` per head, never `P x P`.
    Defaults [our choice; the paper publishes none, its figure shows 1-2 seeds, 2 neighbours]:
    `seeds = 0.125` (an int, or a fraction of the slots the head keeps: budget/8), `neighbours = 2`,
    `rounds = 2`. Negative inner scores (Knorm) are shifted to >= 0 per head first (the decay is
    multiplicative). Applied wherever the inner policy selects (prompt compression, and decoding
    steps for policies that evict while decoding). No state.
    """

    spec_name = "graphkv"
    changes_scores = True

    seeds: int | float = 0.125
    neighbours: int = 2
    rounds: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        seeds = self.seeds
        if isinstance(seeds, bool) or not isinstance(seeds, (int, float)) or seeds <= 0 \
                or (isinstance(seeds, float) and seeds > 1):
            raise ValueError(f"GraphKV: seeds must be an int >= 1 or a float in (0, 1] (fraction of the kept "
                             f"slots), got {seeds!r}")
        for name in ("neighbours", "rounds"):
            value = getattr(self, name)
            check_int("GraphKV", name, value, 1)

    def score(self, layer) -> torch.Tensor:
        candidates = self.eligible(layer) & ~self.protected(layer)  # [B, Hkv, P]
        scores = shift_nonnegative(self.inner.score(layer).float(), candidates)
        if isinstance(self.seeds, float):  # a fraction of the slots a head keeps, from host counts (no sync)
            seeds = max(1, int(self.seeds * self.inner.slot_bound(layer)))
        else:
            seeds = self.seeds
        return propagate_decay(scores, layer.keys, candidates, seeds, self.neighbours, self.rounds)


def propagate_decay(scores: torch.Tensor, keys: torch.Tensor, candidates: torch.Tensor, seeds: int,
                    neighbours: int, rounds: int) -> torch.Tensor:
    """GraphKV's propagation on `scores [B, H, P]` with keys `[B, H, P, D]`; only `candidates` are
    nodes. Returns the updated scores (non-candidates unchanged)."""
    slots = scores.shape[-1]
    seeds, neighbours = min(seeds, slots), min(neighbours, slots)
    unit = F.normalize(keys.float(), dim=-1)  # [B, H, P, D]
    scores = scores.clone()
    is_seed = torch.zeros_like(candidates)
    lowest = torch.finfo(torch.float32).min
    for _ in range(rounds):
        open_nodes = candidates & ~is_seed
        ranked = torch.where(open_nodes, scores, lowest)
        top, picked = top_k_later_first(ranked, seeds)  # [B, H, K]; pooled scores tie often
        picked_valid = top > lowest
        is_seed = is_seed.scatter(-1, picked, picked_valid) | is_seed
        seed_keys = unit.gather(2, picked[..., None].expand(-1, -1, -1, unit.shape[-1]))  # [B, H, K, D]
        similarity = torch.einsum("bhkd,bhpd->bhkp", seed_keys, unit).clamp(min=0.0)  # [B, H, K, P]
        targets = candidates & ~is_seed  # neighbours are never seeds (nor the seed itself)
        similarity = torch.where(targets[:, :, None, :], similarity, -1.0)
        weight, near = top_k_later_first(similarity, neighbours)  # [B, H, K, m]
        weight = weight.clamp(min=0.0) * picked_valid[..., None]
        decay = torch.zeros_like(scores).scatter_add_(-1, near.flatten(2), weight.flatten(2))  # [B, H, P]
        scores = scores - decay * scores
    return scores
