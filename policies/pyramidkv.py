"""PyramidKV: more slots in low layers, fewer in high layers, same total."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.budgets import check_number
from kvpress.policies._layer_schedule import linear_layer_counts
from kvpress.policy import Wrapper


@dataclass
class PyramidKV(Wrapper):
    """Pyramidal per-layer budgets over any policy's scores (SnapKV in the paper): layer `l` of `L`
    keeps `hi - l*(hi - lo)/(L-1)` slots outside the window, with `lo = C/beta`, `hi = 2C - lo`,
    `C = budget - window` the uniform budget, so the mean over layers equals the uniform budget.
    When `hi` would exceed what a layer holds (`seen - window`), `hi` is capped and `lo = 2C - hi`.

    Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
    arXiv 2406.02069; KVCache-Factory `PyramidKVCluster`. Default `beta = 20` (the paper's).
    The inner policy scores and protects; only the per-layer count changes. Layer budgets are the
    differences of the cumulative schedule rounded down, so their sum equals `L * C` exactly
    [our choice]. The reference falls back to uniform budgets when the prompt is shorter than `2C`;
    here the cap above handles short prompts (NVIDIA kvpress) [our choice].
    """

    spec_name = "pyramidkv"
    sets_layer_counts = True

    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("PyramidKV", "beta", self.beta, 1, meaning="top/bottom budget ratio")

    def slot_bound(self, layer) -> int:
        return min(layer.seen, 2 * self.inner.slot_bound(layer))  # the lowest layer keeps at most 2x the mean

    def keep_counts(self, layer) -> torch.Tensor:
        uniform = self.inner.keep_counts(layer)  # [B, Hkv]
        index, count = layer.context.pruned_index, layer.context.pruned_count
        window = uniform.clamp(max=self.window)  # [B, Hkv]
        room = layer.real_seen[:, None] - window
        free = linear_layer_counts(uniform - window, room, index, count, float(self.beta))
        return torch.minimum(free + window, layer.real_seen[:, None])
