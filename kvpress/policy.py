"""Policy base classes: budgets, protected slots, attention-signal requests and top-k selection.

A policy answers one question per layer: which slots to keep. The cache owns the tensors and calls
the policy at two points of every forward of a pruned layer:

1. before attention, `attention_request(phase)` says which attention signal the policy needs
   (none, every query row, the last `w` rows); the attention wrapper computes only that, as the
   per-slot attention mass summed over the query heads of each KV group (`[B, Hkv, S]`, fp32);
2. after attention, the cache folds the signal into `layer.scores` and, when the layer holds more
   than its budget plus the cache's slack, calls `select(layer)` and compacts every per-slot tensor.

A concrete policy writes `score(layer)` (higher = keep) and, if it needs attention, `request`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from kvpress.cache import PrunedLayer

PREFILL = "prefill"
DECODE = "decode"


@dataclass(frozen=True)
class AttentionRequest:
    """Which attention signal a policy needs for one forward of a layer.

    rows: None for every query row of the forward, or `w` for only its last `w` rows (SnapKV's
        observation window).
    decay: per-row weight `decay ** age` (age 0 for the newest row); the running score is also
        multiplied by `decay ** q` before the new mass is added (A2SF's forgetting factor; 1 = H2O).
    accumulate: add the mass to the running score (H2O, A2SF) or replace it (SnapKV, TOVA).
    """

    rows: int | None = None
    decay: float = 1.0
    accumulate: bool = True


@dataclass(frozen=True)
class Selection:
    """Slots to keep: `indices [B, Hkv, K]` sorted ascending (physical order stays temporal) and
    `valid [B, Hkv, K]` (False where a row or head keeps fewer than K real tokens)."""

    indices: torch.Tensor
    valid: torch.Tensor


def check_budget(owner: str, budget, sinks: int = 0, window: int = 0) -> None:
    """Validate a budget and its protected slots; raise `ValueError` naming the argument."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"{owner}: budget must be an int >= 1 (slots per KV head) or a float in (0, 1] "
                         f"(fraction of tokens seen), got {budget!r}")
    if isinstance(budget, float) and not (0.0 < budget <= 1.0):
        raise ValueError(f"{owner}: a float budget is a fraction of the tokens seen and must lie in (0, 1], "
                         f"got {budget}")
    if isinstance(budget, int) and budget <= 0:
        raise ValueError(f"{owner}: budget must be >= 1 slot per KV head, got {budget}")
    for name, value in (("sinks", sinks), ("window", window)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{owner}: {name} must be an int >= 0, got {value!r}")
    if isinstance(budget, int) and sinks + window >= budget:
        raise ValueError(f"{owner}: sinks + window ({sinks} + {window}) must be smaller than budget ({budget}), "
                         f"otherwise nothing is left to choose")


def slots_for_budget(budget, real_seen: torch.Tensor) -> torch.Tensor:
    """Slots each row may keep: `[B]` long. Int budget: that many (at most the real tokens seen);
    float budget: `max(1, floor(seen * budget))` of the row's real tokens."""
    if isinstance(budget, float):
        keep = torch.clamp(torch.floor(real_seen.double() * budget).long(), min=1)
    else:
        keep = torch.full_like(real_seen, budget)
    return torch.minimum(keep, real_seen)


class EvictionPolicy:
    """Interface the cache talks to. `Policy` (budget, sinks, window) and `Wrapper` (an inner
    policy) implement it; policies in `kvpress.policies` subclass one of the two."""

    budget: int | float
    sinks: int
    window: int

    def request(self, phase: str) -> AttentionRequest | None:
        """The attention signal needed in `phase` ("prefill" or "decode"); None for none."""
        return None

    def evicts_during(self, phase: str) -> bool:
        return True

    def score(self, layer: PrunedLayer) -> torch.Tensor:
        """`[B, Hkv, P]` fp32, higher = keep. Invalid and protected slots are handled by `select`."""
        raise NotImplementedError(f"{type(self).__name__} must define score()")

    def keep_counts(self, layer: PrunedLayer) -> torch.Tensor:
        """Real slots each (row, head) keeps: `[B, Hkv]` long."""
        per_row = slots_for_budget(self.budget, layer.real_seen)  # [B]
        return per_row[:, None].expand(-1, layer.num_heads)

    def protected(self, layer: PrunedLayer) -> torch.Tensor:
        """`[B, Hkv, P]` bool: the first `sinks` and last `window` real tokens."""
        pos = layer.positions  # [B, Hkv, P], -1 for padding
        recent = pos >= (layer.real_seen[:, None, None] - self.window)
        return layer.valid & ((pos < self.sinks) | recent)

    def select(self, layer: PrunedLayer, slack: int = 0) -> Selection | None:
        """Choose the slots to keep, or None when every (row, head) holds at most its count plus
        `slack` real slots. Surplus physical slots (padding, masked holes) go first."""
        counts = self.keep_counts(layer)  # [B, Hkv]
        # each (row, head) decides alone, so a row evicts exactly as it would in a batch of one
        if not bool((layer.valid.sum(-1) > counts + slack).any()):
            return None
        kept = int(counts.max())
        scores = self.score(layer).float()
        return top_k_selection(scores, layer.valid, self.protected(layer), counts, kept)


@dataclass
class Policy(EvictionPolicy):
    """Base of every eviction policy: a budget, always-kept sinks and recent window, and per-head
    top-k selection on `score(layer)`.

    budget: int slots per KV head per layer, or float in (0, 1] fraction of the tokens seen.
    sinks: first real tokens always kept; window: most recent real tokens always kept. Both count
    inside the budget.
    """

    budget: int | float = 0.25
    sinks: int = 0
    window: int = 0

    def __post_init__(self) -> None:
        check_budget(type(self).__name__, self.budget, self.sinks, self.window)


def top_k_selection(scores: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor,
                    counts: torch.Tensor, kept: int) -> Selection:
    """Per (row, head) top-`counts` slots by score, protected first, invalid last; ties go to the
    later slot. Returns `kept = counts.max()` indices per head, sorted, with surplus marked invalid."""
    big = torch.finfo(torch.float32).max
    ranked = torch.where(protected, big, torch.where(valid, scores.clamp(-big / 2, big / 2), -big))
    # stable sort on the reversed slot order: among equal scores the later slot ranks first
    order = torch.argsort(ranked.flip(-1), dim=-1, descending=True, stable=True)[..., :kept]
    order = ranked.shape[-1] - 1 - order  # [B, Hkv, K]
    rank = torch.arange(kept, device=scores.device)
    keep_valid = (rank < counts[..., None]) & valid.gather(-1, order)
    indices, perm = order.sort(dim=-1)
    return Selection(indices=indices, valid=keep_valid.gather(-1, perm))


@dataclass
class Wrapper(EvictionPolicy):
    """Base of policies that change the scores or budgets of an inner policy (VATP, CAOTE, ...).
    The innermost policy's budget, sinks and window are what the cache enforces."""

    inner: EvictionPolicy

    def __post_init__(self) -> None:
        if not isinstance(self.inner, EvictionPolicy):
            raise ValueError(f"{type(self).__name__}: inner must be a policy, got {self.inner!r}")

    budget = property(lambda self: self.inner.budget)
    sinks = property(lambda self: self.inner.sinks)
    window = property(lambda self: self.inner.window)

    def request(self, phase: str) -> AttentionRequest | None:
        return self.inner.request(phase)

    def evicts_during(self, phase: str) -> bool:
        return self.inner.evicts_during(phase)

    def score(self, layer: PrunedLayer) -> torch.Tensor:
        return self.inner.score(layer)

    def keep_counts(self, layer: PrunedLayer) -> torch.Tensor:
        return self.inner.keep_counts(layer)

    def protected(self, layer: PrunedLayer) -> torch.Tensor:
        return self.inner.protected(layer)
