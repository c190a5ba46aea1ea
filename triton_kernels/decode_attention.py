"""Decode attention over a pruned layer, fused with the per-slot attention mass.

One query token per sequence (`q == 1`), grouped-query heads, a per-slot validity mask. In the same
pass over the cache it returns the attention output and each slot's attention mass summed over the
`G` query heads of its KV head, optionally folded into a running score buffer
`scores <- scores * decay + mass` (H2O: decay 1; A2SF: its forgetting factor). The cache is read
once per step, not once for attention and again for scoring.

Split-K (flash-decoding): the slots of each KV head are cut into splits that run as separate
programs, so one sequence with a long cache still fills the GPU. Pass 1 (`_decode_split_kernel`)
computes, per split and query head, the running max, sum of exponentials and unnormalised output,
and writes the raw logits (`4 * G` bytes per slot, against `2 * D * 2` bytes of bf16 keys and
values read). Pass 2 (`_decode_combine_kernel`) merges the splits into the row log-sum-exp, writes
the output, and turns the stored logits into probabilities, summed over the group: no key is read
twice.

A row that sees no valid slot outputs zeros and adds no mass.
"""

from __future__ import annotations

import torch

from kvpress.triton_kernels._common import (
    HAS_TRITON,
    kernel_flags,
    multiprocessors,
    next_power_of_2,
    tl,
    triton,
    use_triton,
)

BLOCK_N = 64  # slots per tile in pass 1
MASS_BLOCK = 256  # slots per program in pass 2


def decode_attention_reference(
    query: torch.Tensor,  # [B, Hq, 1, D]
    key: torch.Tensor,  # [B, Hkv, S, D]
    value: torch.Tensor,  # [B, Hkv, S, Dv]
    slot_valid: torch.Tensor,  # [B, Hkv, S] bool
    *,
    scaling: float,
    softcap: float | None = None,
    query_valid: torch.Tensor | None = None,  # [B, 1] bool: False rows output zeros, add no mass
    weights: torch.Tensor | None = None,  # [1] fp32 weight of the mass; None: no mass
    scores: torch.Tensor | None = None,  # [B, Hkv, S] fp32, updated in place: scores * decay + mass
    decay: float = 1.0,
    want_output: bool = True,
    split_size: int | None = None,  # Triton's work split; ignored here
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """PyTorch reference: `(output [B, 1, Hq, Dv] | None, mass [B, Hkv, S] fp32 | None)`; with `scores`
    the second item is `scores` itself, updated in place."""
    batch, q_heads, _, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    qf = query[:, :, 0].float().reshape(batch, kv_heads, group, dim)
    logits = torch.einsum("bhgd,bhsd->bhgs", qf, key.float()) * scaling  # [B, Hkv, G, S]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~slot_valid[:, :, None, :], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)  # rows with no valid slot: 0
    if query_valid is not None:
        probs = probs * query_valid[:, 0, None, None, None]
    output = None
    if want_output:
        output = torch.einsum("bhgs,bhsd->bhgd", probs, value.float())
        output = output.reshape(batch, 1, q_heads, -1).to(query.dtype)
    mass = None
    if weights is not None:
        mass = probs.sum(dim=2) * weights[0]
        if scores is not None:
            mass = scores.mul_(decay).add_(mass)
    return output, mass


def default_split_size(batch_heads: int, slots: int, device: torch.device) -> int:
    """Slots per split: enough splits for about two programs per multiprocessor, whole tiles each."""
    wanted = max(1, (2 * multiprocessors(device)) // max(1, batch_heads))
    tiles = triton.cdiv(max(slots, 1), BLOCK_N)
    per_split = triton.cdiv(tiles, min(wanted, tiles))
    return per_split * BLOCK_N


def decode_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_valid: torch.Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    query_valid: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    decay: float = 1.0,
    want_output: bool = True,
    split_size: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Triton launcher; same contract as `decode_attention_reference`."""
    batch, q_heads, q_len, dim = query.shape
    _, kv_heads, slots, _ = key.shape
    value_dim = value.shape[-1]
    if q_len != 1:
        raise ValueError(f"decode_attention takes one query token per sequence, got {q_len}")
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")
    group = q_heads // kv_heads
    want_mass = weights is not None
    if scores is not None and (not want_mass or scores.dtype != torch.float32 or not scores.is_contiguous()):
        raise ValueError("scores must be a contiguous fp32 [B, Hkv, S] buffer and needs weights")
    device = query.device
    split = split_size or default_split_size(batch * kv_heads, slots, device)
    split = triton.cdiv(split, BLOCK_N) * BLOCK_N
    num_splits = max(1, triton.cdiv(slots, split))
    rows = batch * q_heads
    part_max = torch.empty(rows, num_splits, device=device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    part_out = torch.empty(rows, num_splits, value_dim, device=device, dtype=torch.float32) if want_output \
        else part_max
    logits = torch.empty(rows, slots, device=device, dtype=torch.float32) if want_mass else part_max
    valid = slot_valid.view(torch.uint8)
    flags = kernel_flags(query.dtype)
    block_g = max(16, next_power_of_2(group))  # tl.dot needs 16 rows
    block_d, block_dv = max(16, next_power_of_2(dim)), max(16, next_power_of_2(value_dim))

    _decode_split_kernel[(batch * kv_heads, num_splits)](
        query, key, value, valid, part_max, part_sum, part_out, logits,
        query.stride(0), query.stride(1), query.stride(3),
        key.stride(0), key.stride(1), key.stride(2), key.stride(3),
        value.stride(0), value.stride(1), value.stride(2), value.stride(3),
        valid.stride(0), valid.stride(1), valid.stride(2),
        kv_heads, slots, split, num_splits, float(scaling), float(softcap or 1.0),
        GROUP=group, HEAD_DIM=dim, VALUE_DIM=value_dim,
        BLOCK_G=block_g, BLOCK_N=BLOCK_N, BLOCK_D=block_d, BLOCK_DV=block_dv,
        HAS_SOFTCAP=softcap is not None, WANT_OUTPUT=want_output, WANT_MASS=want_mass, **flags,
    )

    output = torch.empty(batch, 1, q_heads, value_dim, device=device, dtype=query.dtype) if want_output else None
    mass = None
    if want_mass:
        mass = scores if scores is not None else torch.empty(batch, kv_heads, slots, device=device,
                                                             dtype=torch.float32)
    qvalid = query_valid.view(torch.uint8) if query_valid is not None else valid
    mass_blocks = triton.cdiv(slots, MASS_BLOCK) if want_mass else 1
    _decode_combine_kernel[(batch * kv_heads, mass_blocks)](
        part_max, part_sum, part_out, logits, output if want_output else part_max,
        mass if want_mass else part_max, weights if want_mass else part_max, qvalid,
        *(output.stride() if want_output else (0, 0, 0, 0)),
        qvalid.stride(0) if query_valid is not None else 0,
        kv_heads, slots, num_splits, float(decay),
        GROUP=group, VALUE_DIM=value_dim, BLOCK_G=next_power_of_2(group),
        BLOCK_SPLITS=next_power_of_2(num_splits), BLOCK_DV=block_dv, MASS_BLOCK=MASS_BLOCK,
        WANT_OUTPUT=want_output, WANT_MASS=want_mass, HAS_QUERY_VALID=query_valid is not None,
        ACCUMULATE=scores is not None,
    )
    return output, mass


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_valid: torch.Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    query_valid: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    decay: float = 1.0,
    want_output: bool = True,
    split_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Fused decode attention + mass: the Triton launcher on CUDA, the reference elsewhere
    (`backend='triton'|'torch'` forces one)."""
    run = decode_attention_triton if use_triton(query, backend) else decode_attention_reference
    return run(query, key, value, slot_valid, scaling=scaling, softcap=softcap, query_valid=query_valid,
               weights=weights, scores=scores, decay=decay, want_output=want_output, split_size=split_size)


if HAS_TRITON:

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, VALID, PART_MAX, PART_SUM, PART_OUT, LOGITS,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_mb, stride_mh, stride_ms,
        kv_heads, slots, split_size, num_splits, scaling, softcap,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, WANT_OUTPUT: tl.constexpr, WANT_MASS: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One (sequence, KV head, split): online softmax of the G query heads over the split's slots."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // kv_heads
        h = bh % kv_heads
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        g_ok = g < GROUP
        q_ptrs = Q + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=g_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        m_base = VALID + b * stride_mb + h * stride_mh
        row = bh * GROUP + g  # query head rows of the scratch buffers

        run_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        start = split * split_size
        stop = tl.minimum(start + split_size, slots)
        for n0 in range(start, stop, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < stop
            k = tl.load(k_base + n[:, None] * stride_ks + d[None, :] * stride_kd,
                        mask=n_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scaling  # [BLOCK_G, BLOCK_N]
            if HAS_SOFTCAP:  # tanh(s / c) * c, written with exp (the interpreter has no tanh)
                s = (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0)) * softcap
            slot_ok = n_ok & (tl.load(m_base + n * stride_ms, mask=n_ok, other=0) != 0)
            s = tl.where(slot_ok[None, :], s, float("-inf"))
            if WANT_MASS:
                tl.store(LOGITS + row[:, None] * slots + n[None, :], s, mask=g_ok[:, None] & n_ok[None, :])
            new_max = tl.maximum(run_max, tl.max(s, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            alpha = tl.exp(run_max - safe_max)
            p = tl.exp(s - safe_max[:, None])
            run_sum = run_sum * alpha + tl.sum(p, axis=1)
            if WANT_OUTPUT:
                v = tl.load(v_base + n[:, None] * stride_vs + dv[None, :] * stride_vd,
                            mask=n_ok[:, None] & (dv < VALUE_DIM)[None, :], other=0.0)
                if UPCAST:
                    v = v.to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            run_max = new_max
        tl.store(PART_MAX + row * num_splits + split, run_max, mask=g_ok)
        tl.store(PART_SUM + row * num_splits + split, run_sum, mask=g_ok)
        if WANT_OUTPUT:
            out_ptrs = PART_OUT + (row[:, None] * num_splits + split) * VALUE_DIM + dv[None, :]
            tl.store(out_ptrs, acc, mask=g_ok[:, None] & (dv < VALUE_DIM)[None, :])

    @triton.jit
    def _decode_combine_kernel(
        PART_MAX, PART_SUM, PART_OUT, LOGITS, OUT, MASS, WEIGHTS, QUERY_VALID,
        stride_ob, stride_oq, stride_oh, stride_od,
        stride_qvb,
        kv_heads, slots, num_splits, decay,
        GROUP: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
        BLOCK_DV: tl.constexpr, MASS_BLOCK: tl.constexpr,
        WANT_OUTPUT: tl.constexpr, WANT_MASS: tl.constexpr, HAS_QUERY_VALID: tl.constexpr,
        ACCUMULATE: tl.constexpr,
    ):
        """One (sequence, KV head, block of slots): merge the splits into each head's log-sum-exp;
        block 0 writes the output, every block its slots' mass."""
        bh = tl.program_id(0)
        block = tl.program_id(1)
        b = bh // kv_heads
        g = tl.arange(0, BLOCK_G)
        j = tl.arange(0, BLOCK_SPLITS)
        g_ok = g < GROUP
        row = bh * GROUP + g
        part = row[:, None] * num_splits + j[None, :]
        part_ok = g_ok[:, None] & (j < num_splits)[None, :]
        part_max = tl.load(PART_MAX + part, mask=part_ok, other=float("-inf"))
        part_sum = tl.load(PART_SUM + part, mask=part_ok, other=0.0)
        top = tl.max(part_max, axis=1)
        top = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(part_sum * tl.exp(part_max - top[:, None]), axis=1)  # [BLOCK_G]
        seen = total > 0.0
        keep = 1.0
        if HAS_QUERY_VALID:
            keep = (tl.load(QUERY_VALID + b * stride_qvb) != 0).to(tl.float32)

        if WANT_OUTPUT:  # noqa: SIM102 - a compile-time flag around a runtime test
            if block == 0:
                dv = tl.arange(0, BLOCK_DV)
                out = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
                for part_index in range(num_splits):
                    m_s = tl.load(PART_MAX + row * num_splits + part_index, mask=g_ok, other=float("-inf"))
                    acc = tl.load(PART_OUT + (row[:, None] * num_splits + part_index) * VALUE_DIM + dv[None, :],
                                  mask=g_ok[:, None] & (dv < VALUE_DIM)[None, :], other=0.0)
                    out += acc * tl.exp(m_s - top)[:, None]
                scale = tl.where(seen, keep / tl.where(seen, total, 1.0), 0.0)
                out = out * scale[:, None]
                h_q = (bh % kv_heads) * GROUP + g
                out_ptrs = OUT + b * stride_ob + h_q[:, None] * stride_oh + dv[None, :] * stride_od
                tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=g_ok[:, None] & (dv < VALUE_DIM)[None, :])

        if WANT_MASS:
            lse = tl.where(seen, top + tl.log(tl.where(seen, total, 1.0)), float("inf"))
            n = block * MASS_BLOCK + tl.arange(0, MASS_BLOCK)
            n_ok = n < slots
            s = tl.load(LOGITS + row[:, None] * slots + n[None, :], mask=g_ok[:, None] & n_ok[None, :],
                        other=float("-inf"))
            mass = tl.sum(tl.exp(s - lse[:, None]), axis=0) * (tl.load(WEIGHTS) * keep)  # [MASS_BLOCK]
            mass_ptrs = MASS + bh * slots + n
            if ACCUMULATE:
                mass += tl.load(mass_ptrs, mask=n_ok, other=0.0) * decay
            tl.store(mass_ptrs, mass, mask=n_ok)
