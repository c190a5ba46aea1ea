"""Per-head ("ragged") storage of keys and values, for a layer whose KV heads keep different numbers of
slots.

AdaKV gives each KV head of a layer its own count, SpAtten switches whole KV heads off, KVCompose's
unstructured variant ranks (layer, head) pairs. In the `[B, Hkv, P, D]` layout of `SlotStore` every
head is padded to the head that keeps most (kvpress/dense.py) (AdaKV(SnapKV) at budget 0.2 on SmolLM2: 1.44x the bytes
of the slots kept). Here the keys and values of one batch row are one buffer `[B, C + 1, D]` in which
each live KV head owns a run of consecutive rows: the slots it kept at the last re-layout, then `room`
rows for the tokens of the next decoding steps. `C` is a host-side count, the same for every row, so
a batch operation (beam reorder, repeat, select) is an operation on the first axis. Row `C` is the
trash row: slots without storage read it (masked: they are invalid) and a switched-off head writes
its new tokens there.

Slot metadata (validity, positions, the policy's scores) keeps the layer's common `[B, Hkv, P]`
layout, so policies see the same slots whatever the storage. Slot `s` of head `(b, h)` is stored at:

    s < front[b, h]             row start[b, h] + s                       (kept at the last re-layout)
    front[b, h] <= s < width    the trash row                             (surplus slot, never valid)
    width <= s                  row start[b, h] + front[b, h] + s - width (written since; trash when off)

A re-layout (`build`) takes the kept slots of each head with the valid ones first (temporal order
among them), so `front` is the head's count. Attention and policies read a transient `[B, Hkv, P, D]`
view gathered once per forward (`view`) and released after it: the padding is per forward, the
persistent bytes are the slots kept plus `room` per live head (`PerHeadStorage.end_forward`).

`PerHeadStorage` is the storage backend (kvpress/storage.py) of a layer laid out this way: a
`RaggedStore` and the view of the current forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.storage import KVStorage, SlotMetadata


@dataclass(frozen=True)
class HeadRoom:
    """How a re-layout sizes per-head storage: `room` rows per live head for new tokens, `live` the
    live heads (host count), `kept` a host bound of the slots one row keeps over its heads (None:
    read from the device, a sync allowed at prefill only)."""

    room: int
    live: int
    kept: int | None = None


def take(buffer: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`buffer [B, N, D]` at `rows [B, H, S]` -> `[B, H, S, D]`."""
    batch, heads, slots = rows.shape
    index = rows.reshape(batch, heads * slots, 1).expand(-1, -1, buffer.shape[-1])
    return buffer.gather(1, index).view(batch, heads, slots, -1)


def put(buffer: torch.Tensor, rows: torch.Tensor, data: torch.Tensor) -> None:
    """Write `data [B, H, S, D]` into `buffer [B, N, D]` at `rows [B, H, S]`."""
    batch, heads, slots = rows.shape
    index = rows.reshape(batch, heads * slots, 1).expand(-1, -1, buffer.shape[-1])
    buffer.scatter_(1, index, data.reshape(batch, heads * slots, -1).to(buffer.dtype))


class RaggedStore:
    """Keys and values of one layer stored per KV head (see the module docstring)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor, front: torch.Tensor,
                 live: torch.Tensor, width: int, room: int):
        self.keys, self.values = keys, values  # [B, C + 1, D], [B, C + 1, Dv]
        self.start, self.front, self.live = start, front, live  # [B, Hkv] long, long, bool
        self.width, self.room = width, room  # host: slots laid out at the last re-layout, rows per head after

    @classmethod
    def build(cls, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, live: torch.Tensor,
              plan: HeadRoom) -> RaggedStore:
        """Lay out the kept slots `keys/values [B, Hkv, K, D]`, valid ones first in each head (`valid
        [B, Hkv, K]`), with `plan.room` rows after each live head's run (`live [B, Hkv]`)."""
        batch, _, width = valid.shape
        front = valid.sum(-1) * live  # [B, Hkv]
        extent = front + plan.room * live
        start = extent.cumsum(-1) - extent
        if plan.kept is None:
            rows_per_batch = int(extent.sum(-1).max())
        else:
            rows_per_batch = plan.kept + plan.live * plan.room
        slot = torch.arange(width, device=valid.device)
        rows = torch.where(slot < front[..., None], start[..., None] + slot, rows_per_batch)  # [B, Hkv, K]
        stores = []
        for kept in (keys, values):
            buffer = kept.new_empty(batch, rows_per_batch + 1, kept.shape[-1])
            put(buffer, rows, kept)
            buffer[:, rows_per_batch] = 0  # the trash row: surplus slots scattered there are overwritten
            stores.append(buffer)
        return cls(stores[0], stores[1], start, front, live.clone(), width, plan.room)

    @property
    def capacity(self) -> int:
        """Slots (in the layer's common slot layout) the storage can hold before a re-layout."""
        return self.width + self.room

    @property
    def trash(self) -> int:
        return self.keys.shape[1] - 1

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.keys, self.values, self.start, self.front, self.live))

    def rows(self, stop: int, begin: int = 0) -> torch.Tensor:
        """`[B, Hkv, stop - begin]`: the buffer row of slots `begin .. stop - 1`."""
        slot = torch.arange(begin, stop, device=self.start.device)
        start, front = self.start[..., None], self.front[..., None]
        written = torch.where(self.live[..., None], start + front + (slot - self.width), self.trash)
        if begin >= self.width:  # a decoding step's new token
            return written
        kept = torch.where(slot < front, start + slot, self.trash)
        return torch.where(slot < self.width, kept, written)

    def view(self, used: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Transient `[B, Hkv, used, D]` keys and values of the first `used` slots (padding included)."""
        rows = self.rows(used)
        return take(self.keys, rows), take(self.values, rows)

    def gather(self, index: torch.Tensor, used: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the slots `index [B, Hkv, K]` (of the first `used`): `[B, Hkv, K, D]`."""
        rows = self.rows(used).gather(-1, index)
        return take(self.keys, rows), take(self.values, rows)

    def write(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store `keys/values [B, Hkv, q, D]` as slots `slot .. slot + q - 1` (within `capacity`)."""
        rows = self.rows(slot + keys.shape[2], slot)
        put(self.keys, rows, keys)
        put(self.values, rows, values)

    def switch_off(self, heads: torch.Tensor) -> None:
        """Heads where `heads [B, Hkv]` store nothing from now on (their rows go at the next re-layout)."""
        self.live = self.live & ~heads

    def map_tensors(self, fn) -> None:
        for name in ("keys", "values", "start", "front", "live"):
            setattr(self, name, fn(getattr(self, name)))


class PerHeadStorage(KVStorage):
    """Keys and values stored per KV head (a `RaggedStore`), and the `[B, Hkv, P, D]` view gathered for
    the current forward. It grows only by a re-layout (`SlotStore.gather` with a `HeadRoom` plan)."""

    def __init__(self, ragged: RaggedStore):
        self.ragged = ragged
        self.forward_view: tuple[torch.Tensor, torch.Tensor] | None = None  # gathered for the current forward

    per_head = property(lambda self: self.ragged)
    head_dim = property(lambda self: self.ragged.keys.shape[-1])
    itemsize = property(lambda self: self.ragged.keys.element_size())
    nbytes = property(lambda self: self.ragged.nbytes)

    def _current(self, used: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward's view; outside a forward a fresh one that nothing keeps."""
        return self.forward_view if self.forward_view is not None else self.ragged.view(used)

    def read_keys(self, used: int) -> torch.Tensor:
        return self._current(used)[0]

    def read_values(self, used: int) -> torch.Tensor:
        return self._current(used)[1]

    def write(self, meta: SlotMetadata, start: int, keys: torch.Tensor,
              values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.ragged.write(start, keys, values)
        self.forward_view = self.ragged.view(start + keys.shape[2])
        return self.forward_view

    def reserve(self, meta: SlotMetadata, used: int, capacity: int) -> None:
        if capacity > meta.capacity:
            raise RuntimeError("per-head storage grows by a re-layout (eviction.make_room), not in place")

    def take(self, index: torch.Tensor, used: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ragged.gather(index, used)

    def switch_off(self, heads: torch.Tensor) -> None:
        self.ragged.switch_off(heads)

    def end_forward(self, meta: SlotMetadata, used: int) -> None:
        self.forward_view = None

    def map_tensors(self, fn) -> None:
        self.ragged.map_tensors(fn)
        self.forward_view = None
