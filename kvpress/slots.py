"""Slot storage of one pruned layer: keys, values and what each slot holds.

`SlotStore` owns, per layer, keys and values `[B, Hkv, P, D]` (RoPE applied, slots in temporal
order) and, aligned with them, `valid [B, Hkv, P]` (False for padding, for slots dropped while
decoding and for surplus slots of rows or heads that keep fewer tokens) and `positions [B, Hkv, P]`
(index of the token among the row's real tokens, -1 for padding); `real_seen [B]` counts each row's
real tokens and `heads_off [B, Hkv]` marks KV heads that store nothing any more (SpAtten's head
pruning).

Storage has capacity: the `P` slots in use are views of buffers of `capacity >= P` slots, so a new
token is written in place, never by concatenating the layer. A slot dropped while decoding is only
marked invalid (a hole); holes are squeezed out by one gather when the buffer is full.

When the KV heads of a layer keep different numbers of slots (the policy's `per_head_storage`), a
compaction lays keys and values out per head in a `RaggedStore` (kvpress/ragged.py): the bytes follow
the slots each head keeps, and `keys`/`values` are a view gathered for the forward. With quantized
storage the keys and values live in a `QuantizedStore` (kvpress/quantized.py): attention reads it block by
block (kvpress/attention.py), transformers gets shape-only `meta` placeholders, and `keys`/`values`
are dequantized only when a policy reads them during a forward (placeholders between forwards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.kvquant import KVQuant
from kvpress.quantized import QuantizedStore
from kvpress.ragged import HeadRoom, RaggedStore
from kvpress.triton_kernels.compaction import compact_slots


def _grow(buffer: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    """`buffer` with `capacity` slots along dim 2, the first `used` copied."""
    grown = buffer.new_empty(*buffer.shape[:2], capacity, *buffer.shape[3:])
    grown[:, :, :used] = buffer[:, :, :used]
    return grown


@dataclass(frozen=True)
class TokenLayout:
    """What the `q` tokens of the next write are, when a policy feeds a layer something other than the
    forward's tokens in order (LazyLLM: a subset of them, and older tokens revived from hidden states):
    `positions [B, q]` each token's index among its row's real tokens (-1 for padding), `valid [B, q]`,
    `real_new [B]` how many of them the row has never seen (its real-token count grows by that),
    `seen_new` the tokens the forward gave (the layer's logical length grows by that), and `ordered`
    (host-side) whether they are all real and in position order, so that a layer that held nothing
    before attends them with plain causal attention."""

    positions: torch.Tensor
    valid: torch.Tensor
    real_new: torch.Tensor
    seen_new: int
    ordered: bool = False


class SlotStore:
    """Keys, values and slot metadata of one pruned layer (see the module docstring)."""

    BUFFERS = ("_keys", "_values", "_valid", "_positions")

    def __init__(self, key_states: torch.Tensor, value_states: torch.Tensor):
        batch, heads = key_states.shape[:2]
        device = key_states.device
        self._keys = key_states.new_empty(batch, heads, 0, key_states.shape[-1])
        self._values = value_states.new_empty(batch, heads, 0, value_states.shape[-1])
        self._valid = torch.ones(batch, heads, 0, dtype=torch.bool, device=device)
        self._positions = torch.zeros(batch, heads, 0, dtype=torch.long, device=device)
        self.used = 0  # slots in use, a host-side count
        self.real_seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.heads_off: torch.Tensor | None = None
        self.live_heads = heads  # host-side: KV heads not switched off in some row
        self.ragged: RaggedStore | None = None
        self._ragged_view: tuple[torch.Tensor, torch.Tensor] | None = None  # gathered for the current forward
        self.quantized: QuantizedStore | None = None
        self._quantized_view: tuple[torch.Tensor, torch.Tensor] | None = None  # meta placeholders
        self._dequantized: tuple[torch.Tensor, torch.Tensor] | None = None  # read by a policy this forward
        self._in_forward = False
        # host-side: the model's own mask describes the slots (no eviction yet, no hole)
        self.exact_prefix = True
        self.has_padding = False
        self._real_before = self.real_seen
        self._new_tokens = 0

    # ---- views ----
    @property
    def keys(self) -> torch.Tensor:
        if self._quantized_view is not None:
            return self._quantized_read()[0]
        if self.ragged is not None:
            return self._per_head_view()[0]
        return self._keys[:, :, :self.used]

    @property
    def values(self) -> torch.Tensor:
        if self._quantized_view is not None:
            return self._quantized_read()[1]
        if self.ragged is not None:
            return self._per_head_view()[1]
        return self._values[:, :, :self.used]

    def _quantized_read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantized storage as a policy reads it during a forward (dequantized once, when first read),
        or shape-only placeholders between forwards."""
        if self.quantized is None or not self._in_forward:
            return self._quantized_view
        if self._dequantized is None:
            keys, values = self.quantized.dequantize()
            store = self.quantized
            self._dequantized = (torch.cat([keys, store.residual_keys], dim=-2),
                                 torch.cat([values, store.residual_values], dim=-2))
        return self._dequantized

    def _per_head_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward's view of per-head storage; outside a forward a fresh one that nothing keeps."""
        if self._ragged_view is not None:
            return self._ragged_view
        return self.ragged.view(self.used)

    @property
    def valid(self) -> torch.Tensor:
        return self._valid[:, :, :self.used]

    @property
    def positions(self) -> torch.Tensor:
        return self._positions[:, :, :self.used]

    @property
    def capacity(self) -> int:
        return self._valid.shape[2]

    @property
    def num_slots(self) -> int:
        return self.used

    @property
    def head_dim(self) -> int:
        return self._keys.shape[-1]

    @property
    def itemsize(self) -> int:
        """Bytes per element of the model's keys and values."""
        return self._keys.element_size()

    @property
    def num_heads(self) -> int:
        return self._valid.shape[1]

    @property
    def batch(self) -> int:
        return self._valid.shape[0]

    # ---- writing ----
    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` slots (keys, values and metadata)."""
        if capacity <= self.capacity or self.quantized is not None:
            return
        if self.ragged is not None:
            raise RuntimeError("per-head storage grows by a re-layout (eviction.make_room), not in place")
        for name in self.BUFFERS:
            setattr(self, name, _grow(getattr(self, name), self.used, capacity))

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor,
               layout: TokenLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `q` new tokens after the used slots, provisionally all real (`mark_new_tokens` corrects
        padding), or as `layout` describes them; return the keys and values attention reads this forward."""
        batch, heads, q = key_states.shape[:3]
        start = self.used
        self._new_tokens = q
        self._real_before = self.real_seen
        self.real_seen = self.real_seen + q
        if self.quantized is not None:
            self.quantized.append(key_states, value_states)
            self._valid = torch.cat([self.valid, self._valid.new_ones(batch, heads, q)], dim=-1)
            self._positions = torch.cat([self.positions, self._positions.new_zeros(batch, heads, q)], dim=-1)
            self._quantized_view, self._dequantized = self.quantized.placeholders(), None
            self._in_forward = True
        elif self.ragged is not None:
            self.ragged.write(start, key_states, value_states)
        else:
            self.reserve(start + q)
            self._keys[:, :, start:start + q] = key_states
            self._values[:, :, start:start + q] = value_states
        self.used = start + q
        new_valid = self._valid[:, :, start:start + q]
        new_valid.fill_(True)
        if self.heads_off is not None:
            new_valid &= ~self.heads_off[..., None]
        if layout is not None:
            new_valid &= layout.valid[:, None, :]
            self._positions[:, :, start:start + q] = layout.positions[:, None, :]
            self.real_seen = self._real_before + layout.real_new
            self.exact_prefix = False  # slots no longer follow the model's mask columns
        else:
            offsets = torch.arange(q, device=self.real_seen.device) if q > 1 else 0
            self._positions[:, :, start:start + q] = (self._real_before[:, None] + offsets)[:, None, :]
        if self.ragged is not None:
            self._ragged_view = self.ragged.view(self.used)
        if self.quantized is not None:  # attention reads the store itself
            return self._quantized_view
        return self.keys, self.values

    def mark_new_tokens(self, new_valid: torch.Tensor) -> None:
        """Validity and real-token positions of the newest `q` slots from `new_valid [B, q]` (False for
        padding, read from the model's mask). A host sync: called at prefill only."""
        q = self._new_tokens
        offsets = torch.cumsum(new_valid.long(), dim=-1) - 1  # [B, q]
        positions = torch.where(new_valid, self._real_before[:, None] + offsets, -1)
        self.valid[..., -q:] = new_valid[:, None, :]
        if self.heads_off is not None:
            self.valid[..., -q:] &= ~self.heads_off[..., None]
        self.positions[..., -q:] = positions[:, None, :]
        self.real_seen = self._real_before + new_valid.sum(-1)
        if not bool(new_valid.all()):
            self.has_padding = True

    def switch_off_heads(self, heads: torch.Tensor) -> None:
        """Stop storing and attending the KV heads where `heads [B, Hkv]` is True: their slots become
        invalid, later tokens are not stored in them, and their query heads output zeros."""
        self.heads_off = heads if self.heads_off is None else self.heads_off | heads
        self.valid.logical_and_(~self.heads_off[..., None])
        self.exact_prefix = False
        self.live_heads = int((~self.heads_off).sum(-1).max())  # a host sync, once per layer (prefill)
        if self.ragged is not None:
            self.ragged.switch_off(heads)

    def drop(self, keep: torch.Tensor) -> None:
        """Keep only the slots where `keep [B, Hkv, P]`; the others become holes. No data moves and no
        host sync: this is the decoding step's eviction."""
        self.valid.logical_and_(keep)
        self.exact_prefix = False

    def gather(self, index: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor | None = None,
               capacity: int | None = None, per_head: HeadRoom | None = None,
               quantized: int | None = None) -> torch.Tensor | None:
        """Keep the slots `index [B, Hkv, K]` (sorted ascending), with validity `valid [B, Hkv, K]`, at the
        front of the buffers; with `capacity`, in new buffers of that many slots (a prefill that kept a
        small part of a long prompt releases the rest). With `per_head`, lay keys and values out per
        head instead (`RaggedStore`; `index` then has each head's valid slots first). With quantized
        storage the first `quantized` entries of every head are quantized slots and the rest residual
        ones (`QuantizedStore.keep`). `scores [B, Hkv, P]`, the policy's running score, is gathered in
        the same launch and returned."""
        width = index.shape[-1]
        if self.quantized is not None:
            if quantized is None:
                raise ValueError("SlotStore.gather: quantized storage needs `quantized`, the kept quantized slots per head")
            self.quantized.keep(index, quantized, valid)
            self._quantized_view, self._dequantized = self.quantized.placeholders(), None
            positions = self.positions.gather(-1, index)
            kept_scores = scores.gather(-1, index) if scores is not None else None
            self._positions, self._valid = positions, valid.clone()
        elif per_head is not None or self.ragged is not None:
            if self.ragged is not None:
                keys, values = self.ragged.gather(index, self.used)
            else:
                rows = index[..., None]
                keys = self.keys.gather(2, rows.expand(-1, -1, -1, self._keys.shape[-1]))
                values = self.values.gather(2, rows.expand(-1, -1, -1, self._values.shape[-1]))
            positions = self.positions.gather(-1, index)
            kept_scores = scores.gather(-1, index) if scores is not None else None
            self._ragged_view = None
            if per_head is not None:
                live = ~self.heads_off if self.heads_off is not None else torch.ones_like(valid[..., 0])
                self.ragged = RaggedStore.build(keys, values, valid, live, per_head)
                self._keys, self._values = keys.new_empty(*keys.shape[:2], 0, keys.shape[-1]), \
                    values.new_empty(*values.shape[:2], 0, values.shape[-1])  # shape and dtype only
                capacity = self.ragged.capacity
            else:  # back to one layout for every head
                self.ragged = None
                self._keys, self._values = keys, values
            capacity = max(capacity or width, width)
            for name, kept in (("_keys", self._keys), ("_values", self._values), ("_positions", positions),
                               ("_valid", valid)):
                setattr(self, name, _grow(kept, kept.shape[2], capacity) if kept.shape[2] else kept)
        else:
            if scores is not None:  # one Triton launch on CUDA, torch gathers elsewhere
                keys, values, positions, kept_scores, _ = compact_slots(
                    self.keys, self.values, self.positions, scores, index)
            else:
                rows = index[..., None]
                keys = self.keys.gather(2, rows.expand(-1, -1, -1, self._keys.shape[-1]))
                values = self.values.gather(2, rows.expand(-1, -1, -1, self._values.shape[-1]))
                positions, kept_scores = self.positions.gather(-1, index), None
            for name, kept in (("_keys", keys), ("_values", values), ("_positions", positions), ("_valid", valid)):
                if capacity is not None:
                    setattr(self, name, _grow(kept, width, max(capacity, width)))
                else:
                    getattr(self, name)[:, :, :width] = kept
        self.used = width
        self.exact_prefix = False
        return kept_scores

    def map_tensors(self, fn) -> None:
        """A batch operation or device move on every per-row tensor."""
        if self.quantized is not None:
            self.quantized.apply_batch(fn)
            self._quantized_view = self.quantized.placeholders()
            self._keys, self._values = self._quantized_view
        if self.ragged is not None:
            self.ragged.map_tensors(fn)
            self._ragged_view = None
        for name in self.BUFFERS:
            tensor = getattr(self, name)
            if tensor.device.type != "meta":
                setattr(self, name, fn(tensor))
        self.real_seen = fn(self.real_seen)
        self._real_before = self.real_seen
        if self.heads_off is not None:
            self.heads_off = fn(self.heads_off)

    # ---- quantized storage lifecycle ----
    def end_forward(self, quant: KVQuant | None) -> None:
        """After a forward's eviction: the first time `quant` is given, move the kept slots into quantized
        storage (scored first, then quantized); afterwards quantize residual slots whose group filled.
        Then release the dequantized tensors attention read (meta placeholders keep the shape), or the
        view of per-head storage."""
        self._real_before = self.real_seen
        if self.quantized is None:
            if quant is None:
                self._ragged_view = None
                return
            self.quantized = QuantizedStore(quant, self.keys.contiguous(), self.values.contiguous(), self.valid)
            self._valid, self._positions = self.valid.clone(), self.positions.clone()
            self.ragged = self._ragged_view = None
        else:
            self.quantized.flush(self.valid[..., self.quantized.quantized_slots:])
        self._quantized_view, self._dequantized, self._in_forward = self.quantized.placeholders(), None, False
        self._keys, self._values = self._quantized_view

    @property
    def kv_nbytes(self) -> int:
        """Bytes allocated for keys and values: whole buffers (capacity included), per-head storage (with its
        room and layout), or the quantized store."""
        if self.quantized is not None:
            return self.quantized.nbytes
        if self.ragged is not None:
            return self.ragged.nbytes
        return self._keys.nbytes + self._values.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes allocated: keys and values (`kv_nbytes`) plus slot metadata."""
        held = self._valid.nbytes + self._positions.nbytes + self.real_seen.nbytes
        if self.heads_off is not None:
            held += self.heads_off.nbytes
        return held + self.kv_nbytes
