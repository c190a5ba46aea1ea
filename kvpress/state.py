"""Policy state owned by the cache.

A policy keeps what it remembers between forwards (running scores, cross-layer importance, chosen
sizes) in `State` objects. The cache creates them through the policy (`new_layer_state`,
`new_shared_state`) and owns them, so one contract covers every kind of state:

- `append_slots(q)`: new slots were written; slot-aligned tensors grow with zeros;
- `gather_slots(index)`: the layer compacted to `index [B, Hkv, K]`; slot-aligned tensors follow;
- `map_tensors(fn)`: a batch operation (beam reorder, repeat, select) or a device move, applied to
  every tensor whose first axis is the batch.

A policy object is then a pure description: many caches, threads and processes can share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


class State:
    """Base of every policy state. Subclasses name their tensors: `slot_fields` are `[B, Hkv, P, ...]`
    and aligned with the layer's slots; `row_fields` are `[B, ...]` and not aligned with slots."""

    slot_fields: ClassVar[tuple[str, ...]] = ()
    row_fields: ClassVar[tuple[str, ...]] = ()

    def append_slots(self, count: int) -> None:
        for name in self.slot_fields:
            tensor = getattr(self, name)
            if tensor is not None:
                tail = tensor.new_zeros(*tensor.shape[:2], count, *tensor.shape[3:])
                setattr(self, name, torch.cat([tensor, tail], dim=2))

    def gather_slots(self, index: torch.Tensor) -> None:
        for name in self.slot_fields:
            tensor = getattr(self, name)
            if tensor is not None:
                expanded = index.view(*index.shape, *([1] * (tensor.dim() - 3))).expand(
                    *index.shape, *tensor.shape[3:])
                setattr(self, name, tensor.gather(2, expanded))

    def map_tensors(self, fn) -> None:
        for name in self.slot_fields + self.row_fields:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.slot_fields + self.row_fields
                   if getattr(self, name) is not None)


@dataclass(eq=False)
class ScoreState(State):
    """The running per-slot score of an attention-scoring policy: `scores [B, Hkv, P]` fp32, this
    layer's attention mass folded as the policy's `AttentionRequest` says (kvpress/policy.py)."""

    scores: torch.Tensor
    slot_fields: ClassVar[tuple[str, ...]] = ("scores",)

    @classmethod
    def empty(cls, batch: int, heads: int, device) -> ScoreState:
        return cls(torch.zeros(batch, heads, 0, dtype=torch.float32, device=device))


@dataclass(eq=False)
class Allocation(State):
    """Sizes chosen for a layer by a cross-layer allocation at the end of prefill: `counts [B, Hkv]`
    slots per (row, head), and `uniform [B, Hkv]` what the uniform budget gave at that moment. While
    decoding, the layer keeps `counts` plus whatever the uniform budget has grown by since (zero for
    an int budget), so a float budget keeps its fraction and an int budget its size."""

    counts: torch.Tensor
    uniform: torch.Tensor
    row_fields: ClassVar[tuple[str, ...]] = ("counts", "uniform")

    def counts_now(self, uniform_now: torch.Tensor) -> torch.Tensor:
        return self.counts + (uniform_now - self.uniform).clamp(min=0)
