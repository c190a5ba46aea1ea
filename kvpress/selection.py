"""Selection maths: which slots a policy's scores keep. Engine code, written once for every policy.

A policy supplies scores (`score`), counts (`keep_counts`), protected slots (`protected`) and
eligible slots (`eligible`); this module turns them into the slots kept: top-k per (row, head) at
prefill (`select`, a `Selection` to compact to), or a keep mask over the slots in place while
decoding (`keep_mask`: no host sync, no data movement). Ties go to the later slot in both. Also the
two small orderings every part of the engine needs: valid slots first (`valid_first_order`) and a
rank from a sort order (`rank_from_order`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def valid_first_order(valid: torch.Tensor) -> torch.Tensor:
    """Indices along the last axis that put the True entries of `valid` first, each group in its
    original (slot, temporal) order."""
    return torch.argsort(valid.to(torch.int8), dim=-1, descending=True, stable=True)


def rank_from_order(order: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The rank of each entry given `order`, the indices that sort along `dim` (rank 0 = first)."""
    positions = torch.arange(order.shape[dim], device=order.device)
    if dim % order.dim() != order.dim() - 1:
        shape = [1] * order.dim()
        shape[dim] = -1
        positions = positions.view(shape)
    return torch.empty_like(order).scatter_(dim, order, positions.expand_as(order))


@dataclass(frozen=True)
class Selection:
    """Slots to keep: `indices [B, Hkv, K]` sorted ascending (physical order stays temporal) and
    `valid [B, Hkv, K]` (False where a row or head keeps fewer than K real tokens). For per-head
    storage the valid slots of each head come first, still in slot order (`valid_first`)."""

    indices: torch.Tensor
    valid: torch.Tensor

    def valid_first(self) -> Selection:
        """The same slots with each head's valid ones first (in slot order), the surplus after: the
        order per-head storage lays them out in (kvpress/ragged.py)."""
        order = valid_first_order(self.valid)
        return Selection(indices=self.indices.gather(-1, order), valid=self.valid.gather(-1, order))


def rank_for_selection(scores: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Scores to sort by: protected slots above everything, invalid ones below everything."""
    big = torch.finfo(torch.float32).max
    return torch.where(protected, big, torch.where(valid, scores.clamp(-big / 2, big / 2), -big))


def top_k_later_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(values, indices)` of the `k` largest `scores` along the last dimension, ties to the later slot
    (the rule of every selection here). `torch.topk` breaks ties by its own search order, which
    changes with the slot layout: a left-padded row would then pick other slots than the row alone."""
    order = torch.argsort(scores.flip(-1), dim=-1, descending=True, stable=True)[..., :k]
    indices = scores.shape[-1] - 1 - order
    return scores.gather(-1, indices), indices


def top_k_selection(scores: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor,
                    counts: torch.Tensor, kept: int) -> Selection:
    """Per (row, head) top-`counts` slots by score, protected first, invalid last; ties go to the
    later slot. Returns `kept` indices per head, sorted, with surplus marked invalid."""
    ranked = rank_for_selection(scores, valid, protected)
    # stable sort on the reversed slot order: among equal scores the later slot ranks first
    order = torch.argsort(ranked.flip(-1), dim=-1, descending=True, stable=True)[..., :kept]
    order = ranked.shape[-1] - 1 - order  # [B, Hkv, K]
    rank = torch.arange(kept, device=scores.device)
    keep_valid = (rank < counts[..., None]) & valid.gather(-1, order)
    indices, perm = order.sort(dim=-1)
    return Selection(indices=indices, valid=keep_valid.gather(-1, perm))


def select(policy, layer, slack: int = 0, counts: torch.Tensor | None = None) -> Selection | None:
    """The slots `policy` keeps in `layer`, or None when no (row, head) is over its count plus `slack`.
    `counts` overrides `keep_counts` (the cross-layer stage). Surplus slots (padding, masked holes,
    slots that are not eligible) go first."""
    counts = policy.keep_counts(layer) if counts is None else counts  # [B, Hkv]
    eligible = policy.eligible(layer)
    if not policy.over_budget(layer, counts, slack) and not bool((layer.valid & ~eligible).any()):
        return None
    kept = min(int(counts.max()), layer.num_slots)
    scores = policy.score(layer).float()
    return top_k_selection(scores, eligible, policy.protected(layer) & eligible, counts, kept)


def follows_the_budget(policy) -> bool:
    """Whether the chain's counts follow the budget (uniform, scaled, or fixed once by a cross-layer
    allocation) and every valid slot is eligible: no member sets counts of its own at every step
    (PyramidKV, AdaKV, SpAtten) or evicts whole blocks (PagedEviction)."""
    return not any(member.block_wise or ((member.sets_layer_counts or member.sets_head_counts)
                                         and not member.allocates_across_layers) for member in policy.chain())


def drops_one_at_most(policy, layer) -> bool:
    """Whether this decoding step can push a (row, head) at most one slot over its count: one token
    came since the last eviction and the chain's counts follow the budget (decided once, when the
    layer's context was built)."""
    return layer.tokens_since_eviction == 1 and layer.context.follows_budget


def _lowest_ranked(policy, layer) -> torch.Tensor:
    """`[B, Hkv, 1]`: the slot `select` would rank last, the earliest of equal scores: unprotected
    valid slots by score, then protected ones, invalid ones never while a valid one is left. A chain
    whose host-side bound of protected slots is 0 (`protected_bound`) protects none: no mask to fill."""
    big = torch.finfo(torch.float32).max
    ranked = policy.score(layer).float().clamp(-big / 2, big / 2)  # a new tensor: filled in place
    if policy.protected_bound(layer) > 0:
        ranked.masked_fill_(policy.protected(layer), big / 2)
    ranked.masked_fill_(layer.invalid, big)
    return ranked.argmin(dim=-1, keepdim=True)


def one_victim(policy, layer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """When at most one slot per (row, head) can be over (`drops_one_at_most`) and every (row, head)
    holds a valid slot (no heads switched off: the new token is valid): `(victim [B, Hkv, 1], stays
    [B, Hkv, 1] bool)`, the lowest-ranked slot and whether it stays (its head is not over). Writing
    `stays` at `victim` into the validity is the eviction, one `scatter_`; the victim is a valid slot,
    so a head that is not over keeps its validity as it was. None otherwise (`keep_mask`)."""
    if layer.heads_off is not None or not drops_one_at_most(policy, layer):
        return None
    return _victim_and_stays(policy, layer)


def _victim_and_stays(policy, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest-ranked slot `[B, Hkv, 1]` and whether it stays (its (row, head) is not over)."""
    stays = layer.valid.sum(-1, keepdim=True) <= policy.keep_counts(layer)[..., None]  # [B, Hkv, 1]
    return _lowest_ranked(policy, layer), stays


def keep_mask(policy, layer) -> torch.Tensor:
    """`[B, Hkv, P]` bool: the slots `select` would keep, as a mask over the slots in place. No host
    sync and no data movement: the decoding step's eviction. When at most one slot per (row, head)
    can be over, the lowest-ranked one goes (`argmin`: the earliest of equal scores, as `select` keeps
    the later); otherwise every slot is ranked."""
    if drops_one_at_most(policy, layer):  # switched-off heads (else `one_victim` writes in place)
        victim, stays = _victim_and_stays(policy, layer)
        valid = layer.valid
        return valid & ~torch.zeros_like(valid).scatter_(-1, victim, ~stays)
    eligible = policy.eligible(layer)
    ranked = rank_for_selection(policy.score(layer).float(), eligible, policy.protected(layer) & eligible)
    order = torch.argsort(ranked.flip(-1), dim=-1, descending=True, stable=True)
    rank = rank_from_order(order).flip(-1)
    return eligible & (rank < policy.keep_counts(layer)[..., None])
