"""KIVI quantization kernels: quantize, dequantize, and decode attention reading packed keys/values.

Layouts are those of `kvpress.quantized.QuantizedStore` (see docs/quantization.md): codes packed along
`head_dim` (`8 / bits` codes per byte, low bits first); values grouped per slot over `group` channels
(`scale/zero [..., N, D/group]`); keys grouped per channel over the slots of a block
(`scale/zero [..., NB, D]`, `block [..., N]` the block of each slot).

Every Triton launcher `*_triton` has a PyTorch reference `*_reference` with the same signature, built
on the primitives of `kvpress.kivi` (which the cache uses on CPU). Quantization is bit-exact
against the references on a GPU too: the scale `(max - min) / levels` and its reciprocal use
round-to-nearest division (`div_rn`; a plain `/` compiles to an approximate division), codes are
rounded half to even as `torch.round` does, and the quantize kernels are compiled without
multiply-add fusion (a fused `d * inverse + c` rounds once where torch rounds twice).
`group`, `head_dim` and the block length must be powers of two for the kernels (`tl.arange`).
"""

from __future__ import annotations

import torch

from kvpress import kivi
from kvpress.triton_kernels._common import HAS_TRITON, next_power_of_2, on_device_of, tl, triton

# ---- references ----


def quantize_values_reference(x: torch.Tensor, bits: int, group: int):
    """`x [M, D]` -> packed `[M, D*bits/8]` uint8, scale and zero `[M, D/group]` (x's dtype)."""
    return kivi.quantize_values(x, bits, group)


def quantize_keys_reference(x: torch.Tensor, bits: int):
    """Blocks `x [NB, G, D]` of G consecutive slots -> packed `[NB, G, D*bits/8]`, scale/zero `[NB, D]`."""
    packed, scale, zero, _ = kivi.quantize_key_blocks(x[None], bits, x.shape[1])  # heads = blocks
    return packed[0], scale[0, :, 0], zero[0, :, 0]


def dequantize_values_reference(packed, scale, zero, bits: int) -> torch.Tensor:
    return kivi.dequantize_values(packed, scale, zero, bits)


def dequantize_keys_reference(packed, scale, zero, block, bits: int) -> torch.Tensor:
    """`packed [M, Dp]`, `scale/zero [NB, D]`, `block [M]` -> `[M, D]`."""
    return kivi.dequantize_keys(packed[None], scale[None], zero[None], block[None].long(), bits)[0]


def quantized_decode_attention_reference(query, key_codes, key_scale, key_zero, key_block, value_codes,
                                         value_scale, value_zero, residual_keys, residual_values, valid,
                                         *, scaling: float, bits: int, return_logits: bool = False):
    """One decoding step of grouped-query attention over a quantized layer.

    query `[B, Hq, D]`; quantized slots: key_codes/value_codes `[B, H, N, Dp]`, key_scale/key_zero
    `[B, H, NB, D]`, key_block `[B, H, N]`, value_scale/value_zero `[B, H, N, D/group]`; residual
    `[B, H, R, D]`; valid `[B, H, N + R]` bool. Returns `[B, Hq, D]` fp32 (zeros for a head without a
    valid slot); with `return_logits`, also the scaled logits `[B, Hq, N + R]` fp32 (-inf where not
    valid) and their log-sum-exp `[B, Hq]` (-inf for a head without a valid slot), from which the
    caller gets the attention mass without a second pass over the keys."""
    keys = kivi.dequantize_keys(key_codes, key_scale, key_zero, key_block.long(), bits)
    values = kivi.dequantize_values(value_codes, value_scale, value_zero, bits)
    keys = torch.cat([keys, residual_keys], dim=2).float()
    values = torch.cat([values, residual_values], dim=2).float()
    batch, q_heads, dim = query.shape
    kv_heads = keys.shape[1]
    q = query.float().reshape(batch, kv_heads, q_heads // kv_heads, dim)
    logits = torch.einsum("bhgd,bhsd->bhgs", q, keys) * scaling
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgs,bhsd->bhgd", probs, values).reshape(batch, q_heads, dim)
    if not return_logits:
        return out
    return out, logits.reshape(batch, q_heads, -1), torch.logsumexp(logits, dim=-1).reshape(batch, q_heads)


# ---- kernels ----
if HAS_TRITON:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def _jit(fn):
        """Decorate the way triton.language's own functions (`tl.min`, ...) were, at triton's import:
        a kernel decorated for the interpreter cannot call them otherwise, so the result must not
        depend on whether `TRITON_INTERPRET=1` was set before or after triton was imported."""
        return InterpretedFunction(fn) if isinstance(tl.min, InterpretedFunction) else JITFunction(fn)

    @_jit
    def _unpack(packed_ptr, row, cols, PACKED: tl.constexpr, BITS: tl.constexpr, mask):
        """Codes of columns `cols` of rows `row` (broadcast), read from the packed bytes."""
        PER: tl.constexpr = 8 // BITS
        byte = tl.load(packed_ptr + row * PACKED + cols // PER, mask=mask, other=0).to(tl.int32)
        return ((byte >> ((cols % PER) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)

    @_jit
    def _pack_store(out_ptr, rows, codes, BLOCK_M: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                    row_mask):
        """Pack `codes [BLOCK_M, D]` (int32 < 2**BITS) along D and store `[BLOCK_M, D*BITS/8]` bytes."""
        PER: tl.constexpr = 8 // BITS
        PACKED: tl.constexpr = D // PER
        grouped = tl.reshape(codes, (BLOCK_M, PACKED, PER))
        shifts = tl.arange(0, PER) * BITS
        packed = tl.sum(grouped << shifts[None, None, :], axis=2)
        cols = tl.arange(0, PACKED)
        tl.store(out_ptr + rows[:, None] * PACKED + cols[None, :], packed.to(tl.uint8), mask=row_mask[:, None])

    @_jit
    def _round_half_even(x):
        """`torch.round` for |x| < 2**22: adding 1.5 * 2**23 leaves no fraction bits, so the fp32 add
        rounds to the nearest integer, ties to even (1.5 * 2**23 is even); subtracting it is exact."""
        return (x + 12582912.0) - 12582912.0

    @_jit
    def _to_nearest(x, DTYPE: tl.constexpr):
        """fp32 `x` in `DTYPE`, rounded to nearest even as torch's `.to()`. bf16 is rounded here in
        integer arithmetic (the interpreter's bf16 cast truncates; a GPU's rounds): adding
        `0x7FFF + lowest kept bit` carries into the kept bits exactly when rounding goes up."""
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            nan = (bits & 0x7FFFFFFF) > 0x7F800000  # stays NaN
            rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = tl.where(nan, x, rounded.to(tl.float32, bitcast=True))
        return x.to(DTYPE)

    @_jit
    def _quantize_values_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, M, D: tl.constexpr, GROUP: tl.constexpr,
                                BITS: tl.constexpr, BLOCK_M: tl.constexpr):
        NG: tl.constexpr = D // GROUP
        LEVELS: tl.constexpr = (1 << BITS) - 1
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: past 2**31 elements
        row_mask = rows < M
        g = tl.arange(0, NG)
        c = tl.arange(0, GROUP)
        offsets = rows[:, None, None] * D + g[None, :, None] * GROUP + c[None, None, :]
        x = tl.load(x_ptr + offsets, mask=row_mask[:, None, None], other=0.0).to(tl.float32)
        low = tl.min(x, axis=2)
        high = tl.max(x, axis=2)
        scale = tl.math.div_rn(high - low, LEVELS * 1.0)
        scale = _to_nearest(scale, scale_ptr.dtype.element_ty)
        zero = _to_nearest(low, zero_ptr.dtype.element_ty)
        s = scale.to(tl.float32)
        inverse = tl.where(s > 0, tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.where(s > 0, s, 1.0)), 0.0)
        codes = _round_half_even((x - zero.to(tl.float32)[:, :, None]) * inverse[:, :, None])
        codes = tl.minimum(tl.maximum(codes, 0.0), LEVELS).to(tl.int32)
        param = rows[:, None] * NG + g[None, :]
        tl.store(scale_ptr + param, scale, mask=row_mask[:, None])
        tl.store(zero_ptr + param, zero, mask=row_mask[:, None])
        _pack_store(packed_ptr, rows, tl.reshape(codes, (BLOCK_M, D)), BLOCK_M, D, BITS, row_mask)

    @_jit
    def _quantize_keys_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, D: tl.constexpr, G: tl.constexpr,
                              BITS: tl.constexpr):
        LEVELS: tl.constexpr = (1 << BITS) - 1
        blk = tl.program_id(0).to(tl.int64)
        t = tl.arange(0, G)
        d = tl.arange(0, D)
        x = tl.load(x_ptr + blk * G * D + t[:, None] * D + d[None, :]).to(tl.float32)  # [G, D]
        low = tl.min(x, axis=0)
        high = tl.max(x, axis=0)
        scale = _to_nearest(tl.math.div_rn(high - low, LEVELS * 1.0), scale_ptr.dtype.element_ty)
        zero = _to_nearest(low, zero_ptr.dtype.element_ty)
        s = scale.to(tl.float32)
        inverse = tl.where(s > 0, tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.where(s > 0, s, 1.0)), 0.0)
        codes = _round_half_even((x - zero.to(tl.float32)[None, :]) * inverse[None, :])
        codes = tl.minimum(tl.maximum(codes, 0.0), LEVELS).to(tl.int32)
        tl.store(scale_ptr + blk * D + d, scale)
        tl.store(zero_ptr + blk * D + d, zero)
        _pack_store(packed_ptr, blk * G + t, codes, G, D, BITS, t < G)

    @_jit
    def _dequantize_kernel(packed_ptr, scale_ptr, zero_ptr, block_ptr, out_ptr, M, D: tl.constexpr,
                           PARAMS: tl.constexpr, BITS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                           BLOCK_M: tl.constexpr):
        """Values (`PER_CHANNEL=False`): params per row `[M, PARAMS]`, group = D / PARAMS channels.
        Keys (`PER_CHANNEL=True`): params per block `[NB, D]`, the block of row m is `block[m]`."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: past 2**31 elements
        row_mask = rows < M
        d = tl.arange(0, D)
        codes = _unpack(packed_ptr, rows[:, None], d[None, :], D * BITS // 8, BITS, row_mask[:, None])
        if PER_CHANNEL:
            blk = tl.load(block_ptr + rows, mask=row_mask, other=0)
            param = blk[:, None] * D + d[None, :]
        else:
            param = rows[:, None] * PARAMS + d[None, :] // (D // PARAMS)
        scale = tl.load(scale_ptr + param, mask=row_mask[:, None], other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + param, mask=row_mask[:, None], other=0.0).to(tl.float32)
        out = codes * scale + zero
        tl.store(out_ptr + rows[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])

    @_jit
    def _quantized_decode_kernel(q_ptr, kc_ptr, ks_ptr, kz_ptr, kb_ptr, vc_ptr, vs_ptr, vz_ptr, rk_ptr, rv_ptr,
                                 valid_ptr, out_ptr, logits_ptr, lse_ptr, scaling, N, NB, R, HQ: tl.constexpr,
                                 HKV: tl.constexpr, D: tl.constexpr, NG: tl.constexpr, BITS: tl.constexpr,
                                 BLOCK_N: tl.constexpr, STORE_LOGITS: tl.constexpr):
        """One program per (batch row, query head): online softmax over the quantized slots (codes
        unpacked and dequantized in registers), then over the full-precision residual. With
        `STORE_LOGITS`, the scaled logits of every slot and the final log-sum-exp are stored too."""
        pid = tl.program_id(0).to(tl.int64)
        b = pid // HQ
        hq = pid % HQ
        h = hq // (HQ // HKV)
        head = b * HKV + h  # row of [B * HKV, ...] tensors
        PACKED: tl.constexpr = D * BITS // 8
        d = tl.arange(0, D)
        q = tl.load(q_ptr + (b * HQ + hq) * D + d).to(tl.float32) * scaling
        m_i = tl.full((), float("-inf"), tl.float32)
        l_i = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((D,), tl.float32)
        for start in range(0, N, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_mask = n < N
            rows = head * N + n
            blk = tl.load(kb_ptr + rows, mask=n_mask, other=0)
            k = _unpack(kc_ptr, rows[:, None], d[None, :], PACKED, BITS, n_mask[:, None])
            kparam = (head * NB + blk)[:, None] * D + d[None, :]
            k = k * tl.load(ks_ptr + kparam, mask=n_mask[:, None], other=0.0).to(tl.float32) \
                + tl.load(kz_ptr + kparam, mask=n_mask[:, None], other=0.0).to(tl.float32)
            ok = n_mask & (tl.load(valid_ptr + head * (N + R) + n, mask=n_mask, other=0) != 0)
            logits = tl.where(ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
            if STORE_LOGITS:
                tl.store(logits_ptr + (b * HQ + hq) * (N + R) + n, logits, mask=n_mask)
            v = _unpack(vc_ptr, rows[:, None], d[None, :], PACKED, BITS, n_mask[:, None])
            vparam = rows[:, None] * NG + d[None, :] // (D // NG)
            v = v * tl.load(vs_ptr + vparam, mask=n_mask[:, None], other=0.0).to(tl.float32) \
                + tl.load(vz_ptr + vparam, mask=n_mask[:, None], other=0.0).to(tl.float32)
            m_new = tl.maximum(m_i, tl.max(logits, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(logits - m_safe)
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new
        for start in range(0, R, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_mask = n < R
            rows = head * R + n
            k = tl.load(rk_ptr + rows[:, None] * D + d[None, :], mask=n_mask[:, None], other=0.0).to(tl.float32)
            ok = n_mask & (tl.load(valid_ptr + head * (N + R) + N + n, mask=n_mask, other=0) != 0)
            logits = tl.where(ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
            if STORE_LOGITS:
                tl.store(logits_ptr + (b * HQ + hq) * (N + R) + N + n, logits, mask=n_mask)
            v = tl.load(rv_ptr + rows[:, None] * D + d[None, :], mask=n_mask[:, None], other=0.0).to(tl.float32)
            m_new = tl.maximum(m_i, tl.max(logits, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(logits - m_safe)
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new
        out = tl.where(l_i > 0, acc / tl.where(l_i > 0, l_i, 1.0), 0.0)
        tl.store(out_ptr + (b * HQ + hq) * D + d, out)
        if STORE_LOGITS:
            lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + b * HQ + hq, lse)


# ---- launchers (same signatures as the references) ----
EXACT = {"enable_fp_fusion": False}  # compile option of the quantize kernels (the interpreter ignores it)

def _check_pow2(**sizes) -> None:
    for name, size in sizes.items():
        if next_power_of_2(size) != size:
            raise ValueError(f"the Triton quantization kernels need a power-of-two {name}, got {size}")


def quantize_values_triton(x: torch.Tensor, bits: int, group: int):
    x = x.contiguous()
    rows, dim = x.shape
    _check_pow2(head_dim=dim, group=group)
    packed = torch.empty(rows, dim * bits // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(rows, dim // group, dtype=x.dtype, device=x.device)
    zero = torch.empty_like(scale)
    block_m = 16
    with on_device_of(x):
        _quantize_values_kernel[(triton.cdiv(rows, block_m),)](x, packed, scale, zero, rows, dim, group, bits, block_m,
                                                               **EXACT)
    return packed, scale, zero


def quantize_keys_triton(x: torch.Tensor, bits: int):
    x = x.contiguous()
    blocks, group, dim = x.shape
    _check_pow2(head_dim=dim, block=group)
    packed = torch.empty(blocks, group, dim * bits // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(blocks, dim, dtype=x.dtype, device=x.device)
    zero = torch.empty_like(scale)
    with on_device_of(x):
        _quantize_keys_kernel[(blocks,)](x, packed, scale, zero, dim, group, bits, **EXACT)
    return packed, scale, zero


def dequantize_values_triton(packed, scale, zero, bits: int) -> torch.Tensor:
    rows, params = scale.shape
    dim = packed.shape[-1] * 8 // bits
    _check_pow2(head_dim=dim, groups=params)
    out = torch.empty(rows, dim, dtype=scale.dtype, device=packed.device)
    block_m = 16
    with on_device_of(packed):
        _dequantize_kernel[(triton.cdiv(rows, block_m),)](packed.contiguous(), scale.contiguous(), zero.contiguous(),
                                                          packed, out, rows, dim, params, bits, False, block_m)
    return out


def dequantize_keys_triton(packed, scale, zero, block, bits: int) -> torch.Tensor:
    rows = packed.shape[0]
    dim = scale.shape[-1]
    _check_pow2(head_dim=dim)
    out = torch.empty(rows, dim, dtype=scale.dtype, device=packed.device)
    block_m = 16
    with on_device_of(packed):
        _dequantize_kernel[(triton.cdiv(rows, block_m),)](packed.contiguous(), scale.contiguous(), zero.contiguous(),
                                                          block.to(torch.int32).contiguous(), out, rows, dim, dim,
                                                          bits, True, block_m)
    return out


def quantized_decode_attention_triton(query, key_codes, key_scale, key_zero, key_block, value_codes,
                                      value_scale, value_zero, residual_keys, residual_values, valid,
                                      *, scaling: float, bits: int, return_logits: bool = False):
    batch, q_heads, dim = query.shape
    kv_heads, slots = key_codes.shape[1], key_codes.shape[2]
    residual = residual_keys.shape[2]
    _check_pow2(head_dim=dim)
    out = torch.empty(batch, q_heads, dim, dtype=torch.float32, device=query.device)
    logits = lse = out  # not written without return_logits
    if return_logits:
        logits = torch.empty(batch, q_heads, slots + residual, dtype=torch.float32, device=query.device)
        lse = torch.empty(batch, q_heads, dtype=torch.float32, device=query.device)
    c = lambda t: t.contiguous()
    with on_device_of(query):
        _quantized_decode_kernel[(batch * q_heads,)](
            c(query), c(key_codes), c(key_scale), c(key_zero), c(key_block.to(torch.int32)), c(value_codes),
            c(value_scale), c(value_zero), c(residual_keys), c(residual_values), c(valid.to(torch.int8)), out,
            logits, lse, scaling, slots, key_scale.shape[2], residual, q_heads, kv_heads, dim,
            value_scale.shape[-1], bits, 32, return_logits)
    return (out, logits, lse) if return_logits else out
