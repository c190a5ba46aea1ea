"""Policy base classes: budgets, protected slots, attention-signal requests, state and top-k selection.

A policy answers one question per layer: which slots to keep. It is a pure description (a dataclass
of hyperparameters); what it remembers lives in `State` objects that the cache creates through it and
owns (kvpress/state.py). The cache talks to the policy at these points of every forward of a pruned
layer:

1. before attention, `request(phase)` says which attention signal the policy needs (none, every query
   row, the last `w` rows); the attention step computes only that, as the per-slot attention mass
   summed over the query heads of each KV group (`[B, Hkv, S]`, fp32);
2. after attention, `update(layer, signals)` folds the signals into the policy's state;
3. when the layer holds more than its keep counts plus the cache's slack (`over_budget`), the cache
   selects (`keep_counts`, `protected`, `eligible`, `score`) and compacts slots and state together,
   then tells the policy (`compacted`).

Policies with `allocates_across_layers` skip step 3 at prefill: once every layer has attended the
prompt, `allocate(layers)` chooses the per-layer counts and every layer compacts (kvpress/eviction.py).

A concrete policy writes `score(layer)` (higher = keep) and, if it needs attention, `request`.
`Wrapper` passes every hook through to its inner policy except the ones it changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import torch

from kvpress.state import ScoreState, State

if TYPE_CHECKING:  # pragma: no cover
    from kvpress.layer import PrunedLayer
    from kvpress.quant_config import KVQuant

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
class Signals:
    """What one forward of a layer measured: `mass [B, Hkv, S]` fp32 as the request asked (None when
    nothing was asked), `output [B, q, Hq, Dv]` the attention output, `q` new tokens in `phase`;
    `query [B, Hq, q, D]` the forward's queries as the attention function received them (RoPE applied)
    and `module` the model's attention module (config, head_dim, scaling), for policies that score
    with the queries themselves (ExpectedAttention, KVzip). `folded`: the fused decode kernel already
    folded the mass into the layer's `ScoreState`."""

    phase: str
    q: int
    request: AttentionRequest | None
    mass: torch.Tensor | None
    output: torch.Tensor
    query: torch.Tensor | None = None
    module: torch.nn.Module | None = None
    folded: bool = False


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
        order = torch.argsort((~self.valid).to(torch.int8), dim=-1, stable=True)
        return Selection(indices=self.indices.gather(-1, order), valid=self.valid.gather(-1, order))


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


def budget_fraction(budget: float) -> Fraction:
    return Fraction(budget).limit_denominator(1_000_000)


def host_slots_for_budget(budget, seen: int) -> int:
    """`slots_for_budget` for a host-side token count: an upper bound of every row's count when `seen`
    counts padding too."""
    if isinstance(budget, float):
        fraction = budget_fraction(budget)
        return min(seen, max(1, seen * fraction.numerator // fraction.denominator))
    return min(seen, budget)


def slots_for_budget(budget, real_seen: torch.Tensor) -> torch.Tensor:
    """Slots each row may keep: `[B]` long. Int budget: that many (at most the real tokens seen);
    float budget: `max(1, floor(seen * budget))` of the row's real tokens, in integer arithmetic
    (the budget as the nearest fraction with a denominator up to 10^6), so no float64 reaches the
    model's device."""
    if isinstance(budget, float):
        fraction = budget_fraction(budget)
        keep = torch.clamp(real_seen * fraction.numerator // fraction.denominator, min=1)
    else:
        keep = torch.full_like(real_seen, budget)
    return torch.minimum(keep, real_seen)


class EvictionPolicy:
    """The protocol the cache talks to (module docstring). `Policy` (budget, sinks, window) and
    `Wrapper` (an inner policy) implement it; policies in `kvpress.policies` subclass one of the two."""

    budget: int | float
    sinks: int
    window: int
    allocates_across_layers: bool = False
    # storage holds exactly the slots kept, no headroom for in-place decoding (a hard memory budget)
    exact_storage: bool = False

    # ---- structure ----
    def chain(self) -> list[EvictionPolicy]:
        """This policy and the ones it wraps, outermost first."""
        return [self]

    # ---- state ----
    def new_layer_state(self, layer: PrunedLayer) -> State | None:
        """State this policy keeps per layer, created by the cache when the layer first stores tokens."""
        return None

    def new_shared_state(self, layer: PrunedLayer) -> State | None:
        """State this policy keeps across the layers of one cache, created at its first use."""
        return None

    def raw_scores(self, layer: PrunedLayer) -> torch.Tensor | None:
        """The running attention mass `[B, Hkv, P]` of the chain's scored policy, unpooled and per KV
        head (None for attention-free policies)."""
        return None

    # ---- signals ----
    def request(self, phase: str) -> AttentionRequest | None:
        """The attention signal needed in `phase` ("prefill" or "decode"); None for none."""
        return None

    def update(self, layer: PrunedLayer, signals: Signals) -> None:
        """Fold one forward's signals into this policy's state."""

    def evicts_during(self, phase: str) -> bool:
        return True

    # ---- selection ----
    def budget_of(self, layer: PrunedLayer) -> int | float:
        """The budget the chain enforces on `layer` (QuantizedPruning replaces it by a slot count)."""
        return self.budget

    def score(self, layer: PrunedLayer) -> torch.Tensor:
        """`[B, Hkv, P]` fp32, higher = keep. Invalid and protected slots are handled by `select`."""
        raise NotImplementedError(f"{type(self).__name__} must define score()")

    def keep_counts(self, layer: PrunedLayer) -> torch.Tensor:
        """Real slots each (row, head) keeps: `[B, Hkv]` long."""
        per_row = slots_for_budget(layer.budget, layer.real_seen)  # [B]
        uniform = per_row[:, None].expand(-1, layer.num_heads)
        return uniform if layer.allocation is None else layer.allocation.counts_now(uniform)

    def slot_bound(self, layer: PrunedLayer) -> int:
        """A host-side upper bound of the slots any (row, head) of `layer` keeps, from host counts only
        (sizes storage without a device-to-host sync). Policies that give some layer or head more than
        the uniform budget (PyramidKV, AdaKV, SpAtten) raise it."""
        uniform = host_slots_for_budget(layer.budget, layer.seen)
        if layer.allocation is None:
            return uniform
        return min(layer.seen, layer.allocation.most + max(0, uniform - layer.allocation.uniform_most))

    def protected_bound(self, layer: PrunedLayer) -> int:
        """A host-side upper bound of the protected slots of one (row, head) of `layer`."""
        return min(layer.seen, self.sinks + self.window)

    def row_bound(self, layer: PrunedLayer) -> int:
        """A host-side upper bound of the slots one batch row of `layer` keeps over all its KV heads
        (sizes per-head storage without a sync). AdaKV, whose heads share the uniform total, lowers it."""
        return layer.num_heads * self.slot_bound(layer)

    def per_head_storage(self, layer: PrunedLayer) -> bool:
        """Whether the KV heads of `layer` keep different numbers of slots, so that its keys and values
        are stored per head (kvpress/ragged.py) rather than padded to the head that keeps most."""
        return False

    def protected(self, layer: PrunedLayer) -> torch.Tensor:
        """`[B, Hkv, P]` bool: the first `sinks` and last `window` real tokens."""
        pos = layer.positions  # [B, Hkv, P], -1 for padding
        recent = pos >= (layer.real_seen[:, None, None] - self.window)
        return layer.valid & ((pos < self.sinks) | recent)

    def eligible(self, layer: PrunedLayer) -> torch.Tensor:
        """`[B, Hkv, P]` bool: slots that may be kept at all (SpAtten: not evicted by a lower layer)."""
        return layer.valid

    def over_budget(self, layer: PrunedLayer, counts: torch.Tensor, slack: int) -> bool:
        """Whether the layer must compact: some (row, head) holds more than its count plus `slack`.
        Each (row, head) decides alone, so a row evicts exactly as it would in a batch of one."""
        return bool((layer.valid.sum(-1) > counts + slack).any())

    def compacted(self, layer: PrunedLayer, selection: Selection | None) -> None:
        """Called after `layer` evicted: kept `selection`, or dropped slots in place while decoding
        (`selection` None). SpAtten records the cascade."""

    def allocate(self, layers: list[PrunedLayer]) -> list[torch.Tensor]:
        """Cross-layer stage: `[B, Hkv]` keep counts for each pruned layer, from every layer's state."""
        raise NotImplementedError(f"{type(self).__name__} does not allocate across layers")

    def storage(self, layer: PrunedLayer) -> KVQuant | None:
        """Quantized storage this policy wants for `layer` (QuantizedPruning), None for full precision."""
        return None

    def select(self, layer: PrunedLayer, slack: int = 0, counts: torch.Tensor | None = None) -> Selection | None:
        """Choose the slots to keep, or None when no (row, head) is over its count plus `slack`.
        `counts` overrides `keep_counts` (the cross-layer stage). Surplus slots (padding, masked
        holes, slots that are not eligible) go first."""
        counts = self.keep_counts(layer) if counts is None else counts  # [B, Hkv]
        eligible = self.eligible(layer)
        if not self.over_budget(layer, counts, slack) and not bool((layer.valid & ~eligible).any()):
            return None
        kept = min(int(counts.max()), layer.num_slots)
        scores = self.score(layer).float()
        return top_k_selection(scores, eligible, self.protected(layer) & eligible, counts, kept)

    def drops_one_at_most(self, layer: PrunedLayer) -> bool:
        """Whether this decoding step can push a (row, head) at most one slot over its count: one token
        came since the last eviction, and the counts never shrink nor exclude slots (the uniform budget,
        a scaled one, or a cross-layer allocation). Policies that redistribute counts or restrict
        eligibility (PyramidKV, AdaKV, SpAtten) override `keep_counts` or `eligible`, so they rank."""
        own = type(self)
        uniform = own.keep_counts is EvictionPolicy.keep_counts and own.eligible is EvictionPolicy.eligible
        return uniform and layer.tokens_since_eviction == 1

    def keep_mask(self, layer: PrunedLayer) -> torch.Tensor:
        """`[B, Hkv, P]` bool: the slots `select` would keep, as a mask over the slots in place. No
        host sync and no data movement: the decoding step's eviction. When at most one slot per (row,
        head) can be over, the lowest-ranked one goes (`argmin`: the earliest of equal scores, as
        `select` keeps the later); otherwise every slot is ranked."""
        if self.drops_one_at_most(layer):
            valid = layer.valid
            big = torch.finfo(torch.float32).max
            scores = self.score(layer).float().clamp(-big / 2, big / 2)
            ranked = torch.where(valid, torch.where(self.protected(layer), big / 2, scores), big)
            victim = ranked.argmin(dim=-1, keepdim=True)  # [B, Hkv, 1]
            over = valid.sum(-1, keepdim=True) > self.keep_counts(layer)[..., None]
            return valid & ~torch.zeros_like(valid).scatter_(-1, victim, over)
        eligible = self.eligible(layer)
        ranked = rank_for_selection(self.score(layer).float(), eligible, self.protected(layer) & eligible)
        order = torch.argsort(ranked.flip(-1), dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                                .expand_as(order)).flip(-1)
        return eligible & (rank < self.keep_counts(layer)[..., None])


@dataclass
class Policy(EvictionPolicy):
    """Base of every eviction policy: a budget, always-kept sinks and recent window, and per-head
    top-k selection on `score(layer)`. A policy that requests attention keeps a `ScoreState` per layer
    (the running mass, folded as its `AttentionRequest` says).

    budget: int slots per KV head per layer, or float in (0, 1] fraction of the tokens seen.
    sinks: first real tokens always kept; window: most recent real tokens always kept. Both count
    inside the budget.
    """

    budget: int | float = 0.25
    sinks: int = 0
    window: int = 0

    def __post_init__(self) -> None:
        check_budget(type(self).__name__, self.budget, self.sinks, self.window)

    def requests_attention(self) -> bool:
        return self.request(PREFILL) is not None or self.request(DECODE) is not None

    def new_layer_state(self, layer) -> State | None:
        if not self.requests_attention():
            return None
        return ScoreState.empty(layer.batch, layer.num_heads, layer.device)

    def raw_scores(self, layer) -> torch.Tensor | None:
        state = layer.state(self)
        return state.scores if state is not None else None

    def update(self, layer, signals: Signals) -> None:
        if signals.mass is None or signals.folded:
            return
        state = layer.state(self)
        request = signals.request
        if not request.accumulate:
            state.scores = signals.mass
        elif request.decay == 1.0:
            state.scores = state.scores + signals.mass
        else:
            state.scores = state.scores * request.decay ** signals.q + signals.mass


def rank_for_selection(scores: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Scores to sort by: protected slots above everything, invalid ones below everything."""
    big = torch.finfo(torch.float32).max
    return torch.where(protected, big, torch.where(valid, scores.clamp(-big / 2, big / 2), -big))


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


class CompositionError(ValueError):
    """A wrapper and an inner policy that cannot work together; the message says which order works."""


@dataclass
class Wrapper(EvictionPolicy):
    """Base of policies that change the scores or budgets of an inner policy (VATP, CAOTE, ...).
    Every hook it does not override goes to the inner policy; the innermost policy's budget, sinks
    and window are what the cache enforces.

    A wrapper that cannot work around some inner policy says so in `refuse(inner)`: the message is
    raised when the wrapper is built (and so by the spec parser)."""

    inner: EvictionPolicy

    def __post_init__(self) -> None:
        if not isinstance(self.inner, EvictionPolicy):
            raise ValueError(f"{type(self).__name__}: inner must be a policy, got {self.inner!r}")
        for policy in self.inner.chain():
            problem = self.refuse(policy)
            if getattr(policy, "runs_decoder_layers", False):
                problem = (f"{type(policy).__name__} prunes what the model computes and never evicts from the cache, "
                           "so there is nothing to rescore or reallocate; use it alone")
            if problem:
                raise CompositionError(f"{type(self).__name__}({type(self.inner).__name__}(...)): {problem}")

    def refuse(self, inner: EvictionPolicy) -> str | None:
        """Why this wrapper cannot wrap `inner` (any policy of the inner chain), or None."""
        return None

    budget = property(lambda self: self.inner.budget)
    sinks = property(lambda self: self.inner.sinks)
    window = property(lambda self: self.inner.window)
    allocates_across_layers = property(lambda self: self.inner.allocates_across_layers)
    exact_storage = property(lambda self: self.inner.exact_storage)

    def chain(self) -> list[EvictionPolicy]:
        return [self, *self.inner.chain()]

    def raw_scores(self, layer):
        return self.inner.raw_scores(layer)

    def request(self, phase):
        return self.inner.request(phase)

    def update(self, layer, signals) -> None:
        self.inner.update(layer, signals)

    def evicts_during(self, phase):
        return self.inner.evicts_during(phase)

    def budget_of(self, layer):
        return self.inner.budget_of(layer)

    def score(self, layer):
        return self.inner.score(layer)

    def keep_counts(self, layer):
        return self.inner.keep_counts(layer)

    def protected(self, layer):
        return self.inner.protected(layer)

    def slot_bound(self, layer):
        return self.inner.slot_bound(layer)

    def row_bound(self, layer):
        return self.inner.row_bound(layer)

    def protected_bound(self, layer):
        return self.inner.protected_bound(layer)

    def per_head_storage(self, layer):
        return self.inner.per_head_storage(layer)

    def drops_one_at_most(self, layer):
        own = type(self)
        uniform = own.keep_counts is Wrapper.keep_counts and own.eligible is Wrapper.eligible
        return uniform and self.inner.drops_one_at_most(layer)

    def eligible(self, layer):
        return self.inner.eligible(layer)

    def over_budget(self, layer, counts, slack):
        return self.inner.over_budget(layer, counts, slack)

    def compacted(self, layer, selection) -> None:
        self.inner.compacted(layer, selection)

    def allocate(self, layers):
        return self.inner.allocate(layers)

    def storage(self, layer):
        return self.inner.storage(layer)
