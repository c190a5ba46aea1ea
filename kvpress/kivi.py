"""KIVI quantization primitives: the PyTorch references the Triton kernels of
triton_kernels/quantization.py must match (the cache runs them on CPU).

Quantization (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv
2402.02750): per group, `m = min`, `M = max`, `s = (M - m) / (2^b - 1)`, `q = round((x - m) / s)`,
`x_hat = q * s + m`, so `|x - x_hat| <= s / 2`. Keys are grouped per channel over `group_size`
consecutive slots (key outliers are channel-wise), values per slot over `group_size` channels. Codes are
packed along `head_dim` (two 4-bit or four 2-bit codes per byte, low bits first), so every slot's codes
are a row of its own. The layout of a layer's quantized storage is kvpress/quantized.py's.
"""

from __future__ import annotations

import math

import torch


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
    """Scale and zero point (= the group minimum) stored in `dtype`. The scale is the correctly rounded
    fp32 quotient `(max - min) / levels`, as the Triton kernels' `div_rn` computes it: the divisor is a
    tensor on the same device because ATen turns a division by a Python number into a multiplication
    by `1 / levels` on CUDA, which differs from the quotient in the last bit for some ranges."""
    divisor = torch.full((), levels, dtype=torch.float32, device=low.device)  # a fill, no host copy or sync
    scale = ((high.float() - low.float()) / divisor).to(dtype)
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

