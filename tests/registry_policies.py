"""One instance of every registered policy, built from `kvpress.policies.REGISTRY` so that a new policy
is covered by the tests that use this helper without editing them."""

from __future__ import annotations

from kvpress.policies import REGISTRY, SnapKV, SpAtten
from kvpress.policies.quantized_pruning import QuantizedPruning
from kvpress.policy import Wrapper


def make_policy(name: str, budget, *, never_evicts: bool = False):
    """`name` from the registry at `budget` (wrappers around SnapKV, which every wrapper accepts).
    With `never_evicts`, parameters that evict or prune whatever the budget (SpAtten's head pruning,
    QuantizedPruning's memory) are set so that nothing is dropped."""
    cls = REGISTRY[name]
    if issubclass(cls, QuantizedPruning):
        if never_evicts:  # full precision: the memory holds every token
            return cls(SnapKV(budget=budget, window=2, kernel=3), memory=1 << 30, per_layer=True, group_size=8)
        return cls(SnapKV(budget=budget, window=2, kernel=3), memory=2500, bits=4, per_layer=True, group_size=8)
    if issubclass(cls, Wrapper):
        return cls(SnapKV(budget=budget, window=2, kernel=3))
    if issubclass(cls, SpAtten) and never_evicts:
        return cls(budget=budget, window=2, head_keep=1.0)
    fields = {"budget": budget}
    if "window" in cls.__dataclass_fields__:
        fields["window"] = 2
    return cls(**fields)
