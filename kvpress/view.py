"""`LayerView`: what a policy reads of a pruned layer (kvpress/layer.py's `PrunedLayer` is one).

Policies score, count and fold signals through these names only, never through the cache or the
layer's storage; eviction and compaction (kvpress/eviction.py) are the engine code that writes.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class LayerView(Protocol):
    """Read-only view of one pruned layer for a policy. Shapes: `B` rows, `Hkv` KV heads, `P` slots."""

    layer_idx: int
    seen: int  # tokens given to the layer (host-side, padding included)
    sliding_window: int | None
    context: Any  # kvpress.context.LayerContext: `pruned_index`, `pruned_count`, the policy chain

    @property
    def keys(self) -> torch.Tensor: ...  # [B, Hkv, P, D], RoPE applied

    @property
    def values(self) -> torch.Tensor: ...  # [B, Hkv, P, Dv]

    @property
    def valid(self) -> torch.Tensor: ...  # [B, Hkv, P] bool

    @property
    def invalid(self) -> torch.Tensor: ...  # [B, Hkv, P] bool, ~valid (computed once while validity is unchanged)

    @property
    def positions(self) -> torch.Tensor: ...  # [B, Hkv, P] long, index among the row's real tokens

    @property
    def real_seen(self) -> torch.Tensor: ...  # [B] real tokens seen per row

    @property
    def num_slots(self) -> int: ...

    @property
    def num_heads(self) -> int: ...

    @property
    def batch(self) -> int: ...

    @property
    def budget(self) -> int | float: ...

    @property
    def scores(self) -> torch.Tensor | None: ...  # [B, Hkv, P] the chain's running attention mass

    def state(self, policy) -> Any: ...

    def shared_state(self, policy) -> Any: ...
