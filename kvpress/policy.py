"""Policy base classes: what a policy author subclasses (`Policy`, `Wrapper`) and the hooks the engine
calls. Selection maths lives in kvpress/selection.py, budget arithmetic in kvpress/budgets.py, the
attention signals in kvpress/signals.py, composition rules in kvpress/composition.py.

A policy answers one question per layer: which slots to keep. It is a pure description (a dataclass
of hyperparameters); what it remembers lives in `State` objects that the cache creates through it and
owns (kvpress/state.py). The cache talks to the policy at these points of every forward of a pruned
layer:

1. before attention, `request(phase)` says which attention signal the policy needs (none, every query
   row, the last `w` rows); the attention step computes only that, as the per-slot attention mass
   summed over the query heads of each KV group (`[B, Hkv, S]`, fp32);
2. after attention, `update(layer, signals)` folds the signals into the policy's state;
3. when the layer holds more than its keep counts plus the cache's slack (`over_budget`), the engine
   selects (kvpress/selection.py, from `keep_counts`, `protected`, `eligible`, `score`) and compacts
   slots and state together, then tells the policy (`compacted`).

Policies with `allocates_across_layers` skip step 3 at prefill: once every layer has attended the
prompt, `allocate(layers)` chooses the per-layer counts and every layer compacts (kvpress/eviction.py).

A concrete policy writes `score(layer)` (higher = keep), if it needs attention `request` (and `update`
when the running mass is not what it keeps), and declares its capabilities; policies that set their
own counts override `keep_counts` (and the host-side bounds that size storage). `Wrapper` passes
every hook through to its inner policy except the ones it changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from kvpress import composition, registry
from kvpress.budgets import check_budget, slots_for_budget
from kvpress.selection import Selection
from kvpress.signals import DECODE, PREFILL, AttentionRequest, Signals
from kvpress.sizing import uniform_slot_bound
from kvpress.state import ScoreState, State

# what a policy module imports from here, besides the base classes
__all__ = ["DECODE", "PREFILL", "AttentionRequest", "EvictionPolicy", "Policy", "Selection", "Signals", "Wrapper",
           "slots_for_budget"]

if TYPE_CHECKING:  # pragma: no cover
    from kvpress.quant_config import KVQuant
    from kvpress.view import LayerView


class EvictionPolicy:
    """The protocol the cache talks to (module docstring). `Policy` (budget, sinks, window) and
    `Wrapper` (an inner policy) implement it; policies in `kvpress.policies` subclass one of the two."""

    budget: int | float
    sinks: int
    window: int

    # ---- declared capabilities (class attributes; kvpress/composition.py decides from them) ----
    spec_name: ClassVar[str]  # declared in a policy's class body: registers it (kvpress/registry.py)
    allocates_across_layers: ClassVar[bool] = False  # chooses every layer's counts at the end of the prompt
    owns_prefill: ClassVar[bool] = False  # scores need the model again after the prompt (`finish_prefill`)
    runs_decoder_layers: ClassVar[bool] = False  # prunes what the decoder layers compute (`run_decoder_layer`)
    sets_layer_counts: ClassVar[bool] = False  # layers keep different numbers of slots
    sets_head_counts: ClassVar[bool] = False  # the KV heads of a layer keep different numbers of slots
    same_tokens_in_every_head: ClassVar[bool] = False
    block_wise: ClassVar[bool] = False  # evicts whole blocks of consecutive slots (`block_size_of`)
    changes_scores: ClassVar[bool] = False  # a wrapper that rescores its inner policy's slots
    couples_neighbouring_slots: ClassVar[bool] = False  # a wrapper whose score of a slot reads its neighbours'
    needs_attention: ClassVar[bool] = False  # a wrapper that reads each slot's attention weight
    sets_storage: ClassVar[bool] = False  # chooses the storage precision and the slots a memory holds
    # storage holds exactly the slots kept, no headroom for in-place decoding (a hard memory budget)
    exact_storage: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "spec_name" in cls.__dict__:
            registry.register(cls)

    def requests_attention(self) -> bool:
        """Whether this policy (chain) asks the attention step for a signal in some phase."""
        return self.request(PREFILL) is not None or self.request(DECODE) is not None

    # ---- structure ----
    def chain(self) -> list[EvictionPolicy]:
        """This policy and the ones it wraps, outermost first."""
        return [self]

    # ---- state ----
    def new_layer_state(self, layer: LayerView) -> State | None:
        """State this policy keeps per layer, created by the cache when the layer first stores tokens."""
        return None

    def new_shared_state(self, layer: LayerView) -> State | None:
        """State this policy keeps across the layers of one cache, created at its first use."""
        return None

    def raw_scores(self, layer: LayerView) -> torch.Tensor | None:
        """The running attention mass `[B, Hkv, P]` of the chain's scored policy, unpooled and per KV
        head (None for attention-free policies)."""
        return None

    # ---- signals ----
    def request(self, phase: str) -> AttentionRequest | None:
        """The attention signal needed in `phase` ("prefill" or "decode"); None for none."""
        return None

    def update(self, layer: LayerView, signals: Signals) -> None:
        """Fold one forward's signals into this policy's state."""

    def evicts_during(self, phase: str) -> bool:
        return True

    def prefill(self, model, input_ids: torch.Tensor, cache, *, tokenizer=None, attention_mask=None,
                **options) -> torch.Tensor:
        """The prompt's prefill for a policy that `owns_prefill` (KVzip: context reconstruction), called by
        `PrunedCache.prefill`; returns the prompt's logits `[B, T, V]`. Other policies are prefilled by
        an ordinary forward and do not define it."""
        raise TypeError(f"{type(self).__name__} does not own its prefill (owns_prefill is False); "
                        "use PrunedCache.prefill or an ordinary forward")

    # ---- selection ----
    def budget_of(self, layer: LayerView) -> int | float:
        """The budget the chain enforces on `layer` (QuantizedPruning replaces it by a slot count)."""
        return self.budget

    def score(self, layer: LayerView) -> torch.Tensor:
        """`[B, Hkv, P]` fp32, higher = keep. Invalid and protected slots are handled by `select`."""
        raise NotImplementedError(f"{type(self).__name__} must define score()")

    def keep_counts(self, layer: LayerView) -> torch.Tensor:
        """Real slots each (row, head) keeps: `[B, Hkv]` long."""
        per_row = slots_for_budget(layer.budget, layer.real_seen)  # [B]
        # every head of a row: a stride-0 view, as `per_row[:, None].expand(-1, Hkv)` in one op
        uniform = per_row.as_strided((per_row.shape[0], layer.num_heads), (per_row.stride(0), 0))
        return uniform if layer.allocation is None else layer.allocation.counts_now(uniform)

    def slot_bound(self, layer: LayerView) -> int:
        """A host-side upper bound of the slots any (row, head) of `layer` keeps, from host counts only
        (sizes storage without a device-to-host sync). Policies that give some layer or head more than
        the uniform budget (PyramidKV, AdaKV, SpAtten) raise it."""
        return uniform_slot_bound(layer)

    def protected_bound(self, layer: LayerView) -> int:
        """A host-side upper bound of the protected slots of one (row, head) of `layer`."""
        return min(layer.seen, self.sinks + self.window)

    def row_bound(self, layer: LayerView) -> int:
        """A host-side upper bound of the slots one batch row of `layer` keeps over all its KV heads
        (sizes per-head storage without a sync). AdaKV, whose heads share the uniform total, lowers it."""
        return layer.num_heads * self.slot_bound(layer)

    def per_head_storage(self, layer: LayerView) -> bool:
        """Whether the KV heads of `layer` keep different numbers of slots, so that its keys and values
        are stored per head (kvpress/ragged.py) rather than padded to the head that keeps most."""
        return False

    def protected(self, layer: LayerView) -> torch.Tensor:
        """`[B, Hkv, P]` bool: the first `sinks` and last `window` real tokens."""
        pos = layer.positions  # [B, Hkv, P], -1 for padding
        kept = pos >= (layer.real_seen.view(-1, 1, 1) - self.window)  # the recent window
        if self.sinks:  # without sinks `pos < 0` marks padding only, which is never valid
            kept = kept | (pos < self.sinks)
        return layer.valid & kept

    def eligible(self, layer: LayerView) -> torch.Tensor:
        """`[B, Hkv, P]` bool: slots that may be kept at all (SpAtten: not evicted by a lower layer)."""
        return layer.valid

    def over_budget(self, layer: LayerView, counts: torch.Tensor, slack: int) -> bool:
        """Whether the layer must compact: some (row, head) holds more than its count plus `slack`.
        Each (row, head) decides alone, so a row evicts exactly as it would in a batch of one."""
        return bool((layer.valid.sum(-1) > counts + slack).any())

    def compacted(self, layer: LayerView, selection: Selection | None) -> None:
        """Called after `layer` evicted: kept `selection`, or dropped slots in place while decoding
        (`selection` None). SpAtten records the cascade."""

    def allocate(self, layers: list[LayerView]) -> list[torch.Tensor]:
        """Cross-layer stage: `[B, Hkv]` keep counts for each pruned layer, from every layer's state."""
        raise NotImplementedError(f"{type(self).__name__} does not allocate across layers")

    def storage(self, layer: LayerView) -> KVQuant | None:
        """Quantized storage this policy wants for `layer` (QuantizedPruning), None for full precision."""
        return None

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
            return
        scores = state.scores  # [B, Hkv, P], a view of the state's buffer
        if scores.shape != signals.mass.shape:  # a new width: the sum becomes the buffer
            state.scores = scores * request.decay ** signals.q + signals.mass
        elif request.decay == 1.0:  # in place in the buffer: the values `scores + mass` would write
            scores.add_(signals.mass)
        else:
            scores.mul_(request.decay ** signals.q).add_(signals.mass)


@dataclass
class Wrapper(EvictionPolicy):
    """Base of policies that change the scores or budgets of an inner policy (VATP, CAOTE, ...).
    Every hook it does not override goes to the inner policy; the innermost policy's budget, sinks
    and window are what the cache enforces.

    Which inner policies a wrapper composes with follows from the capabilities both declare
    (kvpress/composition.py); a pair that cannot work raises `CompositionError` when the wrapper is
    built (and so by the spec parser)."""

    inner: EvictionPolicy

    def __post_init__(self) -> None:
        if not isinstance(self.inner, EvictionPolicy):
            raise ValueError(f"{type(self).__name__}: inner must be a policy, got {self.inner!r}")
        composition.check(self)

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
