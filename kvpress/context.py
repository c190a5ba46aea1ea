"""What a pruned layer needs from the cache it belongs to, handed down instead of a reference to it.

`LayerContext` is immutable and built by `PrunedCache` for each of its pruned layers: the policy
chain, the cache's slack and quantization, the layer's index among the pruned layers, and the
cache's one `CrossLayerState` (the policies' cross-layer state and the pending cross-layer
allocation), shared by every layer of that cache. Eviction and the layer read these; nothing below
the cache holds the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def depth_in(chain, policy) -> int:
    """Position of `policy` in `chain`. Found by identity, not equality (two equal policies may stand in
    one chain); unlike `id`, the position survives `copy.deepcopy`."""
    for depth, member in enumerate(chain):
        if member is policy:
            return depth
    raise ValueError(f"{type(policy).__name__} is not part of this cache's policy chain")


@dataclass(eq=False)
class CrossLayerState:
    """State one cache shares across its layers: each policy's cross-layer state (by depth in the
    chain), whether a cross-layer allocation waits for the end of the prompt, and the index of the
    forward in progress (the attention handoff tells forwards apart by it), and whether the prompt has
    ended (the first one-token forward, `end_prefill()` or `prefill()`), after which a cache built with
    `after_prompt="append"` evicts nothing."""

    states: dict[int, Any] = field(default_factory=dict)
    allocation_pending: bool = False
    forward_index: int = 0
    owner_prefill: bool = False  # inside `PrunedCache.prefill` of a policy that owns its prefill
    prompt_done: bool = False

    def map_tensors(self, fn) -> None:
        for state in self.states.values():
            state.map_tensors(fn)

    @property
    def nbytes(self) -> int:
        return sum(state.nbytes for state in self.states.values())


@dataclass(frozen=True, eq=False)
class LayerContext:
    """What eviction needs to know about a pruned layer's cache: `policy` (None: never evict) and its
    `chain` (outermost first), `slack`, the cache's `quantization` (None: the chain chooses the
    storage), `pruned_index` and `pruned_count` (the layer's place among the pruned layers; 0 and 1
    until the model's layer types are known), the cache's `shared` cross-layer state, and
    `follows_budget`, decided once from the chain's declarations, and the cache's `after_prompt` mode
    ("evict": evict while decoding; "append": compress the prompt once, then append)."""

    policy: Any = None
    chain: tuple = ()
    slack: int = 0
    quantization: Any = None
    pruned_index: int = 0
    pruned_count: int = 1
    shared: CrossLayerState = field(default_factory=CrossLayerState)
    follows_budget: bool = True  # the chain's counts follow the budget (`selection.follows_the_budget`)
    after_prompt: str = "evict"

    @property
    def appending(self) -> bool:
        """The prompt has been compressed and this cache appends every later token without eviction."""
        return self.after_prompt == "append" and self.shared.prompt_done

    def depth_of(self, policy) -> int:
        return depth_in(self.chain, policy)

    def storage_for(self, layer):
        """The storage of `layer`: the cache's `quantization`, else the policy chain's choice."""
        if self.quantization is not None:
            return self.quantization
        return self.policy.storage(layer) if self.policy is not None else None

    def shared_state(self, policy, layer):
        """The cross-layer state of `policy`, created through it at its first use."""
        depth = self.depth_of(policy)
        if depth not in self.shared.states:
            self.shared.states[depth] = policy.new_shared_state(layer)
        return self.shared.states[depth]
