"""Policy state owned by the cache.

A policy keeps what it remembers between forwards (running scores, cross-layer importance, chosen
sizes) in `State` objects. The cache creates them through the policy (`new_layer_state`,
`new_shared_state`) and owns them, so one contract covers every kind of state:

- `append_slots(count, capacity)`: new slots were written after the `used` ones; slot-aligned
  tensors grow by `count` zeros, inside preallocated capacity (no copy of the old slots);
- `gather_slots(index)`: the layer compacted to `index [B, Hkv, K]`; slot-aligned tensors follow;
- `map_tensors(fn)`: a batch operation (beam reorder, repeat, select) or a device move, applied to
  every tensor whose first axis is the batch.

Slot-aligned fields (`slot_fields`) are views of the first `used` slots of a buffer with the layer's
capacity; assigning a tensor of the same width writes into the buffer.

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

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in cls.__dict__.get("slot_fields", ()):
            setattr(cls, name, property(lambda self, _n=name: self._slot_view(_n),
                                        lambda self, value, _n=name: self._slot_write(_n, value)))

    # ---- slot-aligned buffers ----
    def _slot_view(self, name: str) -> torch.Tensor:
        """The first `used` slots of buffer `name`, one view per width (a forward reads a field several
        times: one slicing op serves them all); `_set_buffer` drops it with the buffer it views."""
        used = self.__dict__.get("used", 0)
        views = self.__dict__.setdefault("_views", {})
        cached = views.get(name)
        if cached is None or cached[0] != used:
            cached = views[name] = (used, self.__dict__["_buffer_" + name][:, :, :used])
        return cached[1]

    def release_views(self) -> None:
        """Drop the cached views (the layer calls it at the end of each forward)."""
        self.__dict__.pop("_views", None)

    def _set_buffer(self, name: str, buffer: torch.Tensor) -> None:
        self.__dict__["_buffer_" + name] = buffer
        self.__dict__.get("_views", {}).pop(name, None)
        self.__dict__.get("_zero_tails", set()).discard(name)

    def __getstate__(self):  # copies (deepcopy, pickle) slice their own views again
        return {key: value for key, value in self.__dict__.items() if key != "_views"}

    def _slot_write(self, name: str, value: torch.Tensor) -> None:
        buffer = self.__dict__.get("_buffer_" + name)
        used = self.__dict__.get("used")
        if buffer is not None and used == value.shape[2] and buffer.shape[:2] == value.shape[:2]:
            self._slot_view(name).copy_(value)
        else:  # a new width (first assignment, compaction): the value becomes the buffer
            self._set_buffer(name, value)
            self.__dict__["used"] = value.shape[2]

    def append_slots(self, count: int, capacity: int) -> None:
        """`count` zero slots after the used ones. The slots after them are zeroed once and known to
        stay zero (`_zero_tails`) until the buffer is replaced or compacted into, so a decoding step
        writes nothing here."""
        used = self.__dict__.get("used", 0)
        zero_tails = self.__dict__.setdefault("_zero_tails", set())
        for name in self.slot_fields:
            buffer = self.__dict__["_buffer_" + name]
            if buffer.shape[2] < capacity:
                grown = buffer.new_zeros(*buffer.shape[:2], capacity, *buffer.shape[3:])
                grown[:, :, :used] = buffer[:, :, :used]
                self._set_buffer(name, grown)
                zero_tails.add(name)  # new_zeros: every slot after `used` is zero
                buffer = grown
            if name not in zero_tails:
                buffer[:, :, used:].fill_(0)
                zero_tails.add(name)
        self.__dict__["used"] = used + count

    def gather_slots(self, index: torch.Tensor) -> None:
        for name in self.slot_fields:
            tensor = self._slot_view(name)
            expanded = index.view(*index.shape, *([1] * (tensor.dim() - 3))).expand(*index.shape, *tensor.shape[3:])
            self.keep_gathered(name, tensor.gather(2, expanded))

    def keep_gathered(self, name: str, kept: torch.Tensor) -> None:
        """Write the already gathered slots `kept` of field `name` into the front of its buffer (capacity
        is kept); compaction calls it when one launch gathered the field with the keys and values."""
        buffer = self.__dict__["_buffer_" + name]
        width = kept.shape[2]
        if buffer.shape[2] >= width:
            buffer[:, :, :width] = kept
            self.__dict__.get("_zero_tails", set()).discard(name)  # old slots now lie after `width`
        else:
            self._set_buffer(name, kept)
        self.__dict__["used"] = width

    def map_tensors(self, fn) -> None:
        for name in self.slot_fields:
            self._set_buffer(name, fn(self.__dict__["_buffer_" + name]))
        for name in self.row_fields:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))

    @property
    def nbytes(self) -> int:
        """Bytes allocated (the whole capacity of slot-aligned buffers)."""
        held = sum(self.__dict__["_buffer_" + name].nbytes for name in self.slot_fields)
        return held + sum(getattr(self, name).nbytes for name in self.row_fields if getattr(self, name) is not None)


class ScoreState(State):
    """The running per-slot score of an attention-scoring policy: `scores [B, Hkv, P]` fp32, this
    layer's attention mass folded as the policy's `AttentionRequest` says (kvpress/policy.py)."""

    slot_fields: ClassVar[tuple[str, ...]] = ("scores",)

    def __init__(self, scores: torch.Tensor):
        self.scores = scores

    @classmethod
    def empty(cls, batch: int, heads: int, device) -> ScoreState:
        return cls(torch.zeros(batch, heads, 0, dtype=torch.float32, device=device))


@dataclass(eq=False)
class Allocation(State):
    """Sizes chosen for a layer by a cross-layer allocation at the end of prefill: `counts [B, Hkv]`
    slots per (row, head), and `uniform [B, Hkv]` what the uniform budget gave at that moment; `most`
    and `uniform_most` are the largest of each, on the host (for sizing storage without a sync). While decoding, the layer keeps `counts`
    plus whatever the uniform budget has grown by since (zero for an int budget), so a float budget
    keeps its fraction and an int budget its size."""

    counts: torch.Tensor
    uniform: torch.Tensor
    most: int = 0
    uniform_most: int = 0
    row_fields: ClassVar[tuple[str, ...]] = ("counts", "uniform")

    def counts_now(self, uniform_now: torch.Tensor) -> torch.Tensor:
        return self.counts + (uniform_now - self.uniform).clamp(min=0)
