"""Quantized storage of a layer: KIVI codes for the older slots, the newest in full precision.

Storage of one layer (`QuantizedStore`), slots in temporal order: `[quantized | residual]`.

* quantized slots: `key_codes`/`value_codes [B, H, Nq, D*b/8]` uint8; value `scale/zero [B, H, Nq, D/G]`;
  key `scale/zero [B, H, NB, D]` per *block* and `key_counts [B, H, NB]` int32, the number of slots
  of each block still held. A block is a run of consecutive slots quantized together, so the block
  of a slot is found from the cumulative counts (block ids never decrease along the slots).
* residual: the newest slots in full precision, `[B, H, R', D]`. After every forward the oldest
  `G * floor((R' - residual) / G)` of them are quantized as new key blocks of `G` slots.

Eviction never re-quantizes and never sizes anything from the device. Inside a forward, evicted slots
only become holes (invalid slots, `SlotStore.drop`, kvpress/slots.py), wherever they are. After the forward the layer
keeps a host-sized set of slots (`keep`): in each region, at most the number of slots the policy lets a
(row, head) hold, valid ones first, in slot order; heads that keep fewer valid slots keep some holes.
Kept quantized slots are gathered with their codes, their value scales and their key block, so a kept
token's error stays the error of its one quantization. Block counts are recomputed; a block no kept slot
refers to stays in the table with count 0 (the cumulative counts skip it) until the table exceeds the
dense count `ceil(Nq / G)` plus `reserve_blocks(Nq)`; then the live blocks are moved first and the table
is cut to that size, and a head with more live blocks than that is re-packed into dense blocks. That
re-pack is the only re-quantization of an already-quantized value (one more rounding, at most `s' / 2`).
Key groups are quantized from their valid slots only (`valid`), so a hole never widens a group's range.

The quantization itself (formulas, packing) is kvpress/kivi.py; `KVQuant` (kvpress/quant_config.py) sets
bits, groups and residual. `QuantizedStorage` is the storage backend (kvpress/storage.py) of a
quantized layer: attention reads the store block by block (kvpress/attention.py), transformers gets
shape-only `meta` placeholders, and keys and values are dequantized only when a policy reads them
during a forward.
"""

from __future__ import annotations

import contextlib
import math

import torch

from kvpress.kivi import (
    block_of_slot,
    dequantize_keys,
    dequantize_values,
    quantize_key_blocks,
    quantize_values,
    rows_of_blocks,
    unpack_float,
)
from kvpress.quant_config import KVQuant, reserve_blocks
from kvpress.storage import KVStorage, SlotMetadata


class QuantizedStore:
    """The quantized storage of one `PrunedLayer` (see the module docstring for the layout)."""

    TENSORS = ("key_codes", "key_scale", "key_zero", "key_counts", "value_codes", "value_scale",
               "value_zero", "residual_keys", "residual_values")

    def __init__(self, quant: KVQuant, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None = None):
        """Start from the full-precision slots `keys/values [B, H, P, D]` of a layer (its first forward);
        `valid [B, H, P]` marks the slots that are not padding or holes."""
        quant.check_head_dim(keys.shape[-1])
        self.quant = quant
        self.dtype = keys.dtype
        batch, heads, _, dim = keys.shape
        packed = dim * quant.bits // 8
        self.key_codes = keys.new_empty(batch, heads, 0, packed, dtype=torch.uint8)
        self.value_codes = self.key_codes.clone()
        self.key_scale = keys.new_empty(batch, heads, 0, dim)
        self.key_zero = self.key_scale.clone()
        self.key_counts = torch.zeros(batch, heads, 0, dtype=torch.int32, device=keys.device)
        self.value_scale = keys.new_empty(batch, heads, 0, dim // quant.group_size)
        self.value_zero = self.value_scale.clone()
        self.residual_keys, self.residual_values = keys, values
        self.flush(valid)

    # ---- sizes ----
    @property
    def quantized_slots(self) -> int:
        return self.key_codes.shape[-2]

    @property
    def num_slots(self) -> int:
        return self.quantized_slots + self.residual_keys.shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.TENSORS)

    def breakdown(self) -> dict[str, int]:
        """Bytes per kind: packed codes, scales, zero points, block counts, full-precision residual."""
        return {
            "codes": self.key_codes.nbytes + self.value_codes.nbytes,
            "scales": self.key_scale.nbytes + self.value_scale.nbytes,
            "zeros": self.key_zero.nbytes + self.value_zero.nbytes,
            "block_counts": self.key_counts.nbytes,
            "residual": self.residual_keys.nbytes + self.residual_values.nbytes,
        }

    # ---- reading and appending ----
    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized slots in the model's dtype: keys and values `[B, H, Nq, D]` (for policies that
        read keys or values; attention reads `key_block`/`value_block`)."""
        bits = self.quant.bits
        values = dequantize_values(self.value_codes, self.value_scale, self.value_zero, bits)
        return self.dequantize_keys(), values

    def dequantize_keys(self) -> torch.Tensor:
        block = block_of_slot(self.key_counts, self.quantized_slots)
        return dequantize_keys(self.key_codes, self.key_scale, self.key_zero, block, self.quant.bits)

    def key_block(self, start: int, stop: int) -> torch.Tensor:
        """Keys of slots `start .. stop - 1` (quantized, then residual) as attention reads them: fp32
        `[B, H, stop - start, D]`, dequantized through the model's dtype as `dequantize` does."""
        return self._block(start, stop, keys=True)

    def value_block(self, start: int, stop: int) -> torch.Tensor:
        return self._block(start, stop, keys=False)

    def _block(self, start: int, stop: int, keys: bool) -> torch.Tensor:
        quantized = self.quantized_slots
        parts = []
        if start < quantized:
            end = min(stop, quantized)
            codes = unpack_float((self.key_codes if keys else self.value_codes)[..., start:end, :], self.quant.bits)
            if keys:  # per-channel parameters of each slot's block, for these slots only
                block = block_of_slot(self.key_counts, end, start)
                out = codes * rows_of_blocks(self.key_scale, block).float() + rows_of_blocks(self.key_zero, block).float()
            else:  # per-slot groups of channels
                scale, zero = self.value_scale[..., start:end, :], self.value_zero[..., start:end, :]
                grouped = codes.view(*codes.shape[:-1], scale.shape[-1], -1)
                out = (grouped * scale.float()[..., None] + zero.float()[..., None]).view(codes.shape)
            parts.append(out.to(self.dtype))
        if stop > quantized:
            residual = self.residual_keys if keys else self.residual_values
            parts.append(residual[..., max(start, quantized) - quantized:stop - quantized, :])
        block = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
        return block.float()

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add new full-precision slots to the residual (nothing is dequantized)."""
        self.residual_keys = torch.cat([self.residual_keys, keys], dim=-2)
        self.residual_values = torch.cat([self.residual_values, values], dim=-2)

    def flush(self, valid: torch.Tensor | None = None) -> None:
        """Quantize the oldest residual slots in whole groups, leaving `residual` to `residual + G - 1`.
        `valid [B, H, R']` marks the residual slots that are not holes (key ranges come from those)."""
        group = self.quant.group_size
        count = (self.residual_keys.shape[-2] - self.quant.residual) // group * group
        if count <= 0:
            return
        keys, values = self.residual_keys[..., :count, :], self.residual_values[..., :count, :]
        # copies, so that the quantized slots' full-precision buffer is freed
        self.residual_keys = self.residual_keys[..., count:, :].contiguous()
        self.residual_values = self.residual_values[..., count:, :].contiguous()
        codes, scale, zero, counts = quantize_key_blocks(keys, self.quant.bits, group,
                                                         None if valid is None else valid[..., :count])
        self._append_quantized(codes, scale, zero, counts.expand(*keys.shape[:2], -1), values)

    def _append_quantized(self, key_codes, key_scale, key_zero, key_counts, values) -> None:
        value_codes, value_scale, value_zero = quantize_values(values, self.quant.bits, self.quant.group_size)
        self.key_codes = torch.cat([self.key_codes, key_codes], dim=-2)
        self.key_scale = torch.cat([self.key_scale, key_scale], dim=-2)
        self.key_zero = torch.cat([self.key_zero, key_zero], dim=-2)
        self.key_counts = torch.cat([self.key_counts, key_counts.to(torch.int32)], dim=-1)
        self.value_codes = torch.cat([self.value_codes, value_codes], dim=-2)
        self.value_scale = torch.cat([self.value_scale, value_scale], dim=-2)
        self.value_zero = torch.cat([self.value_zero, value_zero], dim=-2)

    # ---- eviction ----
    def keep(self, index: torch.Tensor, quantized: int, valid: torch.Tensor | None = None) -> None:
        """Keep the slots `index [B, H, K]` (sorted ascending), whose first `quantized` entries are
        quantized slots in every head and the rest residual slots; `valid [B, H, K]` marks the kept
        slots that are not holes. Kept quantized slots keep their codes and scales (no re-quantization);
        everything is sized from `index`'s shape and `quantized`, with no device-to-host sync."""
        nq = self.quantized_slots
        q_index, r_index = index[..., :quantized], index[..., quantized:] - nq
        rows = lambda t, i: t.gather(-2, i[..., None].expand(*i.shape, t.shape[-1]))
        if nq:
            block = block_of_slot(self.key_counts, nq).gather(-1, q_index)  # [B, H, quantized]
            self.key_codes, self.value_codes = rows(self.key_codes, q_index), rows(self.value_codes, q_index)
            self.value_scale, self.value_zero = rows(self.value_scale, q_index), rows(self.value_zero, q_index)
            counts = torch.zeros_like(self.key_counts)
            self.key_counts = counts.scatter_add_(-1, block, torch.ones_like(block, dtype=torch.int32))
        self.residual_keys, self.residual_values = rows(self.residual_keys, r_index), rows(self.residual_values, r_index)
        group = self.quant.group_size
        limit = math.ceil(quantized / group) + reserve_blocks(quantized, group) if quantized else 0
        if self.key_counts.shape[-1] > limit:
            self._squeeze_blocks(limit, None if valid is None else valid[..., :quantized])

    def _squeeze_blocks(self, limit: int, valid: torch.Tensor | None) -> None:
        """Cut the key-block table to `limit` blocks: live blocks first, in slot order; a head with more
        live blocks than `limit` has its quantized keys re-packed into dense blocks of `G` slots (values
        are per slot and stay as they are). Both are computed for every head and chosen per head, so
        nothing is read back from the device."""
        counts = self.key_counts
        order = torch.argsort((counts == 0).to(torch.int8), dim=-1, stable=True)[..., :limit]
        by_order = lambda t: t.gather(-2, order[..., None].expand(*order.shape, t.shape[-1]))
        scale, zero, kept_counts = by_order(self.key_scale), by_order(self.key_zero), counts.gather(-1, order)
        if self.quantized_slots:
            over = ((counts > 0).sum(-1) > limit)[..., None]  # [B, H, 1]
            codes, dense_scale, dense_zero, dense_counts = quantize_key_blocks(
                self.dequantize_keys(), self.quant.bits, self.quant.group_size, valid)
            spare = limit - dense_scale.shape[-2]
            dense_scale = torch.nn.functional.pad(dense_scale, (0, 0, 0, spare))
            dense_zero = torch.nn.functional.pad(dense_zero, (0, 0, 0, spare))
            dense_counts = torch.nn.functional.pad(dense_counts, (0, spare)).expand_as(kept_counts)
            self.key_codes = torch.where(over[..., None], codes, self.key_codes)
            scale, zero = torch.where(over[..., None], dense_scale, scale), torch.where(over[..., None], dense_zero, zero)
            kept_counts = torch.where(over, dense_counts, kept_counts)
        self.key_scale, self.key_zero, self.key_counts = scale, zero, kept_counts.contiguous()

    def apply_batch(self, fn) -> None:
        """Apply a batch-axis operation (beam reorder, repeat, select) to every tensor."""
        for name in self.TENSORS:
            setattr(self, name, fn(getattr(self, name)))

    def placeholders(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape-only (`meta`) keys and values `[B, H, P, D]` for the layer between forwards: the layer's
        slot count and head count stay readable, and any read of data fails loudly."""
        shape = (*self.residual_keys.shape[:2], self.num_slots, self.residual_keys.shape[-1])
        return (torch.empty(shape, dtype=self.dtype, device="meta"), torch.empty(shape, dtype=self.dtype, device="meta"))


class QuantizedStorage(KVStorage):
    """The storage backend of a quantized layer: its `QuantizedStore`, the shape-only placeholders
    transformers gets, and the dequantized keys and values a policy read during the current forward."""

    def __init__(self, quant: KVQuant, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor):
        """Move the full-precision slots `keys/values [B, Hkv, P, D]` (validity `valid`) into quantized
        storage (at the end of the layer's first forward with quantization)."""
        self.store = QuantizedStore(quant, keys, values, valid)
        self.placeholders = self.store.placeholders()
        self.dequantized: tuple[torch.Tensor, torch.Tensor] | None = None  # read by a policy this forward
        self.in_forward = False

    quantized = property(lambda self: self.store)
    head_dim = property(lambda self: self.store.residual_keys.shape[-1])
    itemsize = property(lambda self: self.store.dtype.itemsize)
    nbytes = property(lambda self: self.store.nbytes)

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots as a policy reads them during a forward (dequantized once, when first read), or the
        placeholders between forwards."""
        if not self.in_forward:
            return self.placeholders
        if self.dequantized is None:
            keys, values = self.store.dequantize()
            store = self.store
            self.dequantized = (torch.cat([keys, store.residual_keys], dim=-2),
                                torch.cat([values, store.residual_values], dim=-2))
        return self.dequantized

    @contextlib.contextmanager
    def readable(self):
        """Dequantize on read outside a forward too (placeholders again afterwards)."""
        opened = not self.in_forward
        self.in_forward = True
        try:
            yield
        finally:
            if opened:
                self.in_forward, self.dequantized = False, None

    def read_keys(self, used: int) -> torch.Tensor:
        return self._read()[0]

    def read_values(self, used: int) -> torch.Tensor:
        return self._read()[1]

    def write(self, meta: SlotMetadata, start: int, keys: torch.Tensor,
              values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New slots go to the residual; attention reads the store itself (transformers the placeholders)."""
        self.store.append(keys, values)
        meta.extend(start, keys.shape[2])
        self.placeholders, self.dequantized = self.store.placeholders(), None
        self.in_forward = True
        return self.placeholders

    def reserve(self, meta: SlotMetadata, used: int, capacity: int) -> None:
        pass  # sized exactly: the residual grows by concatenation, eviction cuts it (`compact`)

    def take(self, index: torch.Tensor, used: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("quantized storage is never laid out again: it keeps its slots (`compact`)")

    def compact(self, meta, positions, index, valid, scores, capacity, quantized):
        """The first `quantized` entries of every head's `index` are quantized slots, the rest residual
        ones (`QuantizedStore.keep`); metadata is sized exactly."""
        if quantized is None:
            raise ValueError("SlotStore.gather: quantized storage needs `quantized`, the kept quantized slots per head")
        self.store.keep(index, quantized, valid)
        self.placeholders, self.dequantized = self.store.placeholders(), None
        positions = positions.gather(-1, index)
        kept_scores = scores.gather(-1, index) if scores is not None else None
        meta.valid, meta.positions = valid.clone(), positions
        return kept_scores

    def end_forward(self, meta: SlotMetadata, used: int) -> None:
        """Quantize the residual slots whose group filled, and release what attention and policies read."""
        self.store.flush(meta.valid[:, :, :used][..., self.store.quantized_slots:])
        self.placeholders, self.dequantized, self.in_forward = self.store.placeholders(), None, False

    def map_tensors(self, fn) -> None:
        self.store.apply_batch(fn)
        self.placeholders = self.store.placeholders()
