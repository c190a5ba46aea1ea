"""KIVI-style quantized KV storage for `PrunedCache`, and memory budgets in bytes.

    cache = PrunedCache(SnapKV(budget=1024), quantization=KVQuant(bits=4, group_size=32, residual=128))

Quantization (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv
2402.02750): per group, `m = min`, `M = max`, `s = (M - m) / (2^b - 1)`, `q = round((x - m) / s)`,
`x_hat = q * s + m`, so `|x - x_hat| <= s / 2`. Keys are grouped per channel over `group_size`
consecutive slots (key outliers are channel-wise), values per slot over `group_size` channels. Codes are
packed along `head_dim` (two 4-bit or four 2-bit codes per byte, low bits first), so every slot's codes
are a row of its own.

Storage of one layer (`QuantizedStore`), slots in temporal order: `[quantized | residual]`.

* quantized slots: `key_codes`/`value_codes [B, H, Nq, D*b/8]` uint8; value `scale/zero [B, H, Nq, D/G]`;
  key `scale/zero [B, H, NB, D]` per *block* and `key_counts [B, H, NB]` int32, the number of slots
  of each block still held. A block is a run of consecutive slots quantized together, so the block
  of a slot is found from the cumulative counts (block ids never decrease along the slots).
* residual: the newest slots in full precision, `[B, H, R', D]`. After every forward the oldest
  `G * floor((R' - residual) / G)` of them are quantized as new key blocks of `G` slots.

Eviction never re-quantizes and never sizes anything from the device. Inside a forward, evicted slots
only become holes (invalid slots, `SlotStore.drop`), wherever they are. After the forward the layer
keeps a host-sized set of slots (`keep`): in each region, at most the number of slots the policy lets a
(row, head) hold, valid ones first, in slot order; heads that keep fewer valid slots keep some holes.
Kept quantized slots are gathered with their codes, their value scales and their key block, so a kept
token's error stays the error of its one quantization. Block counts are recomputed; a block no kept slot
refers to stays in the table with count 0 (the cumulative counts skip it) until the table exceeds the
dense count `ceil(Nq / G)` plus `reserve_blocks(Nq)`; then the live blocks are moved first and the table
is cut to that size, and a head with more live blocks than that is re-packed into dense blocks. That
re-pack is the only re-quantization of an already-quantized value (one more rounding, at most `s' / 2`).
Key groups are quantized from their valid slots only (`valid`), so a hole never widens a group's range.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

BITS = (2, 4, 8)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def check_bits(owner: str, bits) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{owner}: bits must be one of {BITS}, got {bits!r}")


@dataclass(frozen=True)
class KVQuant:
    """How a `PrunedCache` stores kept slots: `bits` in {2, 4, 8}, groups of `group_size` (tokens per
    channel for keys, channels per token for values), and the newest `residual` slots in full precision
    until a group of `group_size` older slots fills. KIVI paper defaults: group 32, residual 128."""

    bits: int = 4
    group_size: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        check_bits("KVQuant", self.bits)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"KVQuant: group_size must be an int >= 1 that divides head_dim, got {self.group_size!r}")
        if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"KVQuant: residual must be an int >= 0 (full-precision recent slots), got {self.residual!r}")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % self.group_size:
            divisors = [g for g in range(1, head_dim + 1) if head_dim % g == 0]
            raise ValueError(f"KVQuant: group_size must divide head_dim {head_dim} (values are grouped per token "
                             f"over channels); got group_size={self.group_size}, accepted: {divisors}")
        if (head_dim * self.bits) % 8:
            raise ValueError(f"KVQuant: head_dim {head_dim} times bits {self.bits} must be a multiple of 8 to pack codes")

    def bytes_for_slots(self, slots: int, head_dim: int, itemsize: int) -> int:
        """Upper bound of the bytes a layer's storage holds per KV head (per batch row) when it keeps
        `slots` slots. Below `residual + G` slots nothing is quantized: `slots` full-precision slots.
        Otherwise the residual at its largest (`residual + G - 1` full-precision slots) and up to `slots`
        quantized slots (a head's quantized region holds at most `slots` slots, holes of heads that kept
        more of the residual included), with value scales/zeros per slot, key scales/zeros for the dense
        blocks plus the reserve, and the int32 block counts."""
        tail = self.residual + self.group_size - 1
        if slots <= tail:
            return 2 * slots * head_dim * itemsize
        blocks = math.ceil(slots / self.group_size) + reserve_blocks(slots, self.group_size)
        codes = 2 * slots * head_dim * self.bits // 8
        value_params = 2 * slots * (head_dim // self.group_size) * itemsize
        key_params = blocks * (2 * head_dim * itemsize + 4)
        return codes + value_params + key_params + 2 * tail * head_dim * itemsize


def reserve_blocks(quantized: int, group: int) -> int:
    """Thinned-out key blocks tolerated beyond the dense count before the store re-packs: a quarter of
    the dense count, at least one."""
    return max(1, math.ceil(quantized / group) // 4)


def parse_memory(memory) -> int:
    """Bytes from an int or a string such as `"64MiB"`, `"1.5GB"`, `"512 KB"`, `"4096"` (B, KB/MB/GB/TB
    are powers of 1000, KiB/MiB/GiB/TiB powers of 1024)."""
    if isinstance(memory, bool):
        raise ValueError(f"memory must be an int number of bytes or a string like '64MiB' or '1.5GB', got {memory!r}")
    if isinstance(memory, int):
        value = memory
    elif isinstance(memory, float) and memory.is_integer():
        value = int(memory)
    elif isinstance(memory, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", memory)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"memory {memory!r} is not understood: use an int number of bytes or a number with "
                             f"a unit among B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. '64MiB', '1.5GB')")
        value = int(float(match.group(1)) * _UNITS[unit])
    else:
        raise ValueError(f"memory must be an int number of bytes or a string like '64MiB' or '1.5GB', got {memory!r}")
    if value <= 0:
        raise ValueError(f"memory must be > 0 bytes, got {memory!r}")
    return value


def slots_for_memory(memory: int, head_dim: int, itemsize: int, quant: KVQuant | None) -> int:
    """Most slots per KV head whose keys and values fit in `memory` bytes: full precision
    (`2 * head_dim * itemsize` per slot) when `quant` is None, else `quant.bytes_for_slots` exactly."""
    if quant is None:
        return memory // (2 * head_dim * itemsize)
    low, high = 0, memory * 8 // (2 * head_dim * quant.bits) + 1  # high: no slot costs less than its codes
    while low < high:
        mid = (low + high + 1) // 2
        if quant.bytes_for_slots(mid, head_dim, itemsize) <= memory:
            low = mid
        else:
            high = mid - 1
    return low


# ---- quantization primitives (the PyTorch references of triton_kernels/quantization.py) ----

def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`[..., D]` uint8 codes < 2**bits -> `[..., D * bits / 8]` uint8, code `i` of a byte in bits
    `[i * bits, (i + 1) * bits)`."""
    per = 8 // bits
    if per == 1:
        return codes.to(torch.uint8)
    grouped = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: `[..., Dp]` uint8 -> `[..., Dp * 8 / bits]` uint8 codes."""
    return packed if bits == 8 else unpack_float(packed, bits).to(torch.uint8)


def unpack_float(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """`unpack` straight into fp32 (what dequantization multiplies), one strided write per code position
    of a byte: faster on a CPU than unpacking to uint8 and converting."""
    per = 8 // bits
    if per == 1:
        return packed.float()
    mask = (1 << bits) - 1
    out = torch.empty(*packed.shape, per, dtype=torch.float32, device=packed.device)
    for i in range(per):
        out[..., i] = (packed >> (i * bits)) & mask
    return out.view(*packed.shape[:-1], packed.shape[-1] * per)


def rows_of_blocks(table: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """`table [..., NB, C]` (per-block key scales or zeros) -> `[..., N, C]`, the row of each slot's block
    `block [..., N]`: one `index_select` over the flattened table (on a CPU much faster than a `gather`
    with an index expanded over the channels)."""
    *lead, blocks, channels = table.shape
    tables = torch.arange(math.prod(lead), device=block.device).view(*lead, 1)
    rows = block + tables * blocks
    return table.reshape(-1, channels).index_select(0, rows.reshape(-1)).view(*block.shape, channels)


def affine_params(low: torch.Tensor, high: torch.Tensor, levels: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (= the group minimum) stored in `dtype`."""
    scale = ((high.float() - low.float()) / levels).to(dtype)
    return scale, low.to(dtype)


def encode(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    """Codes `round((x - zero) / scale)` clamped to `[0, levels]`, with broadcast scale/zero; a group
    whose values are all equal (scale 0) gets code 0 and dequantizes to its value exactly."""
    s = scale.float()
    inverse = torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)
    return torch.round((x.float() - zero.float()) * inverse).clamp_(0, levels).to(torch.uint8)


def quantize_values(x: torch.Tensor, bits: int, group: int):
    """Per-slot groups of `group` channels: `x [..., D]` -> packed `[..., D*bits/8]`, scale and zero
    `[..., D/group]` in x's dtype."""
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    scale, zero = affine_params(grouped.amin(-1), grouped.amax(-1), (1 << bits) - 1, x.dtype)
    codes = encode(grouped, scale[..., None], zero[..., None], (1 << bits) - 1)
    return pack(codes.reshape(x.shape), bits), scale, zero


def dequantize_values(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    codes = unpack_float(packed, bits)
    group = codes.shape[-1] // scale.shape[-1]
    grouped = codes.reshape(*codes.shape[:-1], scale.shape[-1], group)
    out = grouped * scale.float()[..., None] + zero.float()[..., None]
    return out.reshape(codes.shape).to(scale.dtype)


def quantize_key_blocks(x: torch.Tensor, bits: int, group: int, valid: torch.Tensor | None = None):
    """Per-channel groups of `group` consecutive slots: `x [B, H, N, D]` -> packed `[B, H, N, Dp]`,
    scale and zero `[B, H, ceil(N/group), D]`, counts `[ceil(N/group)]` (the last block may be short).
    With `valid [B, H, N]`, a group's range comes from its valid slots only (holes get clamped codes;
    a group with no valid slot gets scale and zero 0)."""
    n = x.shape[-2]
    blocks = math.ceil(n / group)
    pad = blocks * group - n
    padded = torch.cat([x, x[..., -1:, :].expand(*x.shape[:-2], pad, x.shape[-1])], dim=-2) if pad else x
    grouped = padded.reshape(*x.shape[:-2], blocks, group, x.shape[-1])
    if valid is None:
        low, high = grouped.amin(-2), grouped.amax(-2)
    else:
        mask = torch.cat([valid, valid.new_zeros(*valid.shape[:-1], pad)], dim=-1) if pad else valid
        mask = mask.reshape(*valid.shape[:-1], blocks, group, 1)
        inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
        low, high = torch.where(mask, grouped, inf).amin(-2), torch.where(mask, grouped, -inf).amax(-2)
        empty = low > high
        low, high = low.masked_fill(empty, 0), high.masked_fill(empty, 0)
    scale, zero = affine_params(low, high, (1 << bits) - 1, x.dtype)
    codes = encode(grouped, scale[..., None, :], zero[..., None, :], (1 << bits) - 1)
    codes = codes.reshape(padded.shape)[..., :n, :]
    counts = torch.full((blocks,), group, dtype=torch.int32, device=x.device)
    if pad:
        counts[-1] = group - pad
    return pack(codes, bits), scale, zero, counts


def block_of_slot(counts: torch.Tensor, stop: int, start: int = 0) -> torch.Tensor:
    """`[B, H, stop - start]` long: the key block of quantized slots `start .. stop - 1`, from per-block
    counts `[B, H, NB]`."""
    ends = counts.long().cumsum(-1)  # [B, H, NB]
    index = torch.arange(start, stop, device=counts.device).expand(*counts.shape[:-1], stop - start).contiguous()
    return torch.searchsorted(ends, index, right=True)


def dequantize_keys(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, block: torch.Tensor,
                    bits: int) -> torch.Tensor:
    """`packed [B, H, N, Dp]`, per-block `scale/zero [B, H, NB, D]`, `block [B, H, N]` -> `[B, H, N, D]`."""
    codes = unpack_float(packed, bits)
    out = codes * rows_of_blocks(scale, block).float() + rows_of_blocks(zero, block).float()
    return out.to(scale.dtype)


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


def kv_bytes(cache) -> int:
    """Bytes of keys and values a cache has allocated (codes, scales, zero points, block counts and
    full-precision residual for quantized layers; key and value storage, capacity included,
    otherwise), without the eviction bookkeeping (`valid`, `positions`, `scores`). Works for
    `PrunedCache` and transformers caches."""
    total = 0
    for layer in getattr(cache, "layers", []):
        slots = getattr(layer, "slots", None)
        if slots is not None:  # a PrunedLayer: its buffers (or quantized store), not only the slots in use
            total += slots.kv_nbytes
            continue
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += _tensor_bytes(getattr(layer, name, None))
    return total


def _tensor_bytes(obj) -> int:
    """Bytes of a tensor, a quanto QTensor (its inner tensors) or an HQQ `(packed, meta)` pair."""
    if obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            return 0
        inner = getattr(obj, "__tensor_flatten__", None)
        if inner is not None and type(obj) is not torch.Tensor:
            names, _ = inner()
            return sum(_tensor_bytes(getattr(obj, n)) for n in names)
        return obj.nbytes
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o) for o in obj.values())
    return 0
