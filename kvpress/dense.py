"""Dense storage: keys and values `[B, Hkv, capacity, D]`, every KV head padded to the same slot count.

The `P` slots in use are views of buffers of `capacity >= P` slots, so a new token is written in
place, never by concatenating the layer. A slot dropped while decoding is only marked invalid (a hole,
in the slot metadata); holes are squeezed out by one gather (`compact`) when the buffer is full.
"""

from __future__ import annotations

import torch

from kvpress.storage import KVStorage, SlotMetadata, grow
from kvpress.triton_kernels.compaction import compact_slots


class DenseStorage(KVStorage):
    """Keys and values in buffers with capacity (see the module docstring)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values  # [B, Hkv, capacity, D], [B, Hkv, capacity, Dv]

    @classmethod
    def empty(cls, key_states: torch.Tensor, value_states: torch.Tensor) -> DenseStorage:
        """No slot yet, the shape and dtype of `key_states/value_states [B, Hkv, q, D]`."""
        batch, heads = key_states.shape[:2]
        return cls(key_states.new_empty(batch, heads, 0, key_states.shape[-1]),
                   value_states.new_empty(batch, heads, 0, value_states.shape[-1]))

    head_dim = property(lambda self: self.keys.shape[-1])
    itemsize = property(lambda self: self.keys.element_size())
    nbytes = property(lambda self: self.keys.nbytes + self.values.nbytes)

    def read_keys(self, used: int) -> torch.Tensor:
        return self.keys[:, :, :used]

    def read_values(self, used: int) -> torch.Tensor:
        return self.values[:, :, :used]

    def write(self, meta: SlotMetadata, start: int, keys: torch.Tensor,
              values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stop = start + keys.shape[2]
        self.reserve(meta, start, stop)
        self.keys[:, :, start:stop] = keys
        self.values[:, :, start:stop] = values
        return self.keys[:, :, :stop], self.values[:, :, :stop]

    def reserve(self, meta: SlotMetadata, used: int, capacity: int) -> None:
        if capacity <= meta.capacity:
            return
        self.keys, self.values = grow(self.keys, used, capacity), grow(self.values, used, capacity)
        meta.grow(used, capacity)

    def take(self, index: torch.Tensor, used: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = index[..., None]
        keys = self.read_keys(used).gather(2, rows.expand(-1, -1, -1, self.keys.shape[-1]))
        values = self.read_values(used).gather(2, rows.expand(-1, -1, -1, self.values.shape[-1]))
        return keys, values

    def compact(self, meta, positions, index, valid, scores, capacity, quantized):
        """With scores, one Triton launch on CUDA (keys, values, positions and scores gathered together),
        torch gathers elsewhere; with `capacity`, into new buffers (a prefill that kept a small part of a
        long prompt releases the rest), else in place."""
        used, width = positions.shape[-1], index.shape[-1]
        if scores is not None:
            keys, values, positions, kept_scores, _ = compact_slots(
                self.read_keys(used), self.read_values(used), positions, scores, index)
        else:
            keys, values = self.take(index, used)
            positions, kept_scores = positions.gather(-1, index), None
        if capacity is None:
            self.keys[:, :, :width] = keys
            self.values[:, :, :width] = values
        else:
            self.keys = grow(keys, width, max(capacity, width))
            self.values = grow(values, width, max(capacity, width))
        meta.keep(positions, valid, capacity)
        return kept_scores

    def end_forward(self, meta: SlotMetadata, used: int) -> None:
        """Nothing to flush: full-precision slots are stored as written."""

    def map_tensors(self, fn) -> None:
        self.keys, self.values = fn(self.keys), fn(self.values)
