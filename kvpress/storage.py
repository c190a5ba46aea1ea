"""The interface of a layer's key/value storage, and the per-slot metadata laid out beside it.

A pruned layer's slots are `[B, Hkv, P]` in one common layout whatever the storage: `SlotMetadata`
holds their validity and positions in buffers of `capacity >= P` slots. Keys and values live in one
`KVStorage` backend, chosen per layer by `SlotStore` (kvpress/slots.py):

| backend | module | keys and values |
| --- | --- | --- |
| `DenseStorage` | kvpress/dense.py | `[B, Hkv, capacity, D]` buffers, new tokens written in place |
| `PerHeadStorage` | kvpress/ragged.py | per KV head (`RaggedStore`), for heads that keep different counts |
| `QuantizedStorage` | kvpress/quantized.py | KIVI codes plus a full-precision residual (`QuantizedStore`) |

A backend decides how its slots grow, so it sizes the metadata buffers with them (`reserve`,
`write`, `compact`); everything else about the slots (real-token counts, switched-off heads, whether
the model's mask still describes them) is `SlotStore`'s.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import torch


def grow(buffer: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    """`buffer` with `capacity` slots along dim 2, the first `used` copied."""
    grown = buffer.new_empty(*buffer.shape[:2], capacity, *buffer.shape[3:])
    grown[:, :, :used] = buffer[:, :, :used]
    return grown


class SlotMetadata:
    """Validity `[B, Hkv, capacity]` bool and positions `[B, Hkv, capacity]` long (index of the token
    among its row's real tokens, -1 for padding) of a layer's slots; the first `used` are in use.

    `tail_ready`: the slots after the used ones already hold what one-token writes will give them
    (valid, the row's next positions; `SlotStore.append`), so a decoding step writes no metadata.
    Replacing a buffer or writing the slots in place (`keep`) clears it."""

    def __init__(self, valid: torch.Tensor, positions: torch.Tensor):
        self.valid, self.positions = valid, positions

    @property
    def valid(self) -> torch.Tensor:
        return self._valid

    @valid.setter
    def valid(self, value: torch.Tensor) -> None:
        self._valid, self.tail_ready = value, False

    @property
    def positions(self) -> torch.Tensor:
        return self._positions

    @positions.setter
    def positions(self, value: torch.Tensor) -> None:
        self._positions, self.tail_ready = value, False

    @property
    def capacity(self) -> int:
        return self.valid.shape[2]

    def grow(self, used: int, capacity: int) -> None:
        """Room for `capacity` slots, the first `used` kept."""
        self.valid = grow(self.valid, used, capacity)
        self.positions = grow(self.positions, used, capacity)

    def extend(self, used: int, q: int) -> None:
        """Exactly `used + q` slots: the first `used` kept, `q` new ones (valid, position 0) after them."""
        batch, heads = self.valid.shape[:2]
        self.valid = torch.cat([self.valid[:, :, :used], self.valid.new_ones(batch, heads, q)], dim=-1)
        self.positions = torch.cat([self.positions[:, :, :used], self.positions.new_zeros(batch, heads, q)], dim=-1)

    def keep(self, positions: torch.Tensor, valid: torch.Tensor, capacity: int | None = None) -> None:
        """The kept slots' `positions` and `valid [B, Hkv, K]` become the first `K`: written in place, or
        with `capacity` in new buffers of `max(capacity, K)` slots."""
        width = valid.shape[-1]
        if capacity is None:
            self.positions[:, :, :width] = positions
            self.valid[:, :, :width] = valid
            self.tail_ready = False
        else:
            self.positions = grow(positions, width, max(capacity, width))
            self.valid = grow(valid, width, max(capacity, width))

    def map_tensors(self, fn) -> None:
        self.valid, self.positions = fn(self.valid), fn(self.positions)

    @property
    def nbytes(self) -> int:
        return self.valid.nbytes + self.positions.nbytes


class KVStorage(ABC):
    """Keys and values of one layer's slots. `used` is the layer's slot count (a host-side count kept
    by `SlotStore`); keys and values come out in the common `[B, Hkv, used, D]` layout."""

    @property
    def per_head(self):
        """The per-head layout (`RaggedStore`) when keys and values are stored per KV head, else None."""
        return None

    @property
    def quantized(self):
        """The KIVI store (`QuantizedStore`) when keys and values are stored quantized, else None."""
        return None

    @property
    @abstractmethod
    def head_dim(self) -> int: ...

    @property
    @abstractmethod
    def itemsize(self) -> int:
        """Bytes per element of the model's keys and values."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (capacity, layout and quantization parameters included)."""

    @abstractmethod
    def read_keys(self, used: int) -> torch.Tensor:
        """Keys `[B, Hkv, used, D]` as a policy reads them (shape-only placeholders where a backend has
        nothing to show between forwards)."""

    @abstractmethod
    def read_values(self, used: int) -> torch.Tensor: ...

    @contextlib.contextmanager
    def readable(self):
        """Keys and values readable by a policy outside a forward (a cross-layer allocation run at the
        end of the prompt). Full-precision storage always is."""
        yield

    @abstractmethod
    def write(self, meta: SlotMetadata, start: int, keys: torch.Tensor,
              values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `keys/values [B, Hkv, q, D]` as slots `start .. start + q - 1` (room made in `meta` too;
        the caller fills their metadata); return the keys and values attention reads this forward."""

    @abstractmethod
    def reserve(self, meta: SlotMetadata, used: int, capacity: int) -> None:
        """Make room for `capacity` slots, or refuse where the layout cannot grow in place."""

    @abstractmethod
    def take(self, index: torch.Tensor, used: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[B, Hkv, K, D]` of the slots `index [B, Hkv, K]` (a re-layout's input)."""

    def compact(self, meta: SlotMetadata, positions: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                scores: torch.Tensor | None, capacity: int | None,
                quantized: int | None) -> torch.Tensor | None:
        """Keep the slots `index [B, Hkv, K]` (of the first `positions.shape[-1]`) at the front, in this
        backend's own layout, with their `positions` and `valid [B, Hkv, K]` in `meta`; return
        `scores [B, Hkv, P]` gathered alike. `capacity` and `quantized` size dense and quantized
        storage. A layout that compacts only by a re-layout (per-head) leaves this to `SlotStore`."""
        raise NotImplementedError(f"{type(self).__name__} is compacted by a re-layout (SlotStore.gather)")

    def switch_off(self, heads: torch.Tensor) -> None:
        """KV heads where `heads [B, Hkv]` is True store nothing from now on."""

    @abstractmethod
    def end_forward(self, meta: SlotMetadata, used: int) -> None:
        """After the forward's eviction: release what only the forward read."""

    @abstractmethod
    def map_tensors(self, fn) -> None:
        """A batch operation or device move on every per-row tensor."""
