"""Decode attention over a pruned layer, fused with the per-slot attention mass.

One query token per sequence (`q == 1`), grouped-query heads, a per-slot validity mask. In the same
pass over the cache it returns the attention output and each slot's attention mass summed over the
`G` query heads of its KV head, optionally folded into a running score buffer
`scores <- scores * decay + mass` (H2O: decay 1; A2SF: its forgetting factor). The cache is read
once per step, not once for attention and again for scoring.

Split-K (flash-decoding): the slots of each KV head are cut into splits that run as separate
programs, so one sequence with a long cache still fills the GPU; the split count follows the
multiprocessor count and the slot count (`default_split_size`). Pass 1 (`_decode_split_kernel`)
computes, per split and query head, the running max, sum of exponentials and unnormalised output,
and writes the raw logits (`4 * G` bytes per slot, against `2 * D * 2` bytes of bf16 keys and
values read). Pass 2 (`_decode_combine_kernel`) merges each head's splits as one vectorised tile
into the output, and turns the stored logits into probabilities summed over the group: no key is
read twice.

A row that sees no valid slot outputs zeros and adds no mass.
"""

from __future__ import annotations

import torch

from kvpress.triton_kernels._common import (
    HAS_TRITON,
    check_attention_operands,
    kernel_flags,
    multiprocessors,
    next_power_of_2,
    on_device_of,
    pick_triton,
    pipeline_stages,
    require_kernel_operands,
    shared_memory_limit,
    tl,
    triton,
)

BLOCK_N = 64  # slots per tile in pass 1
MASS_BLOCK = 256  # slots per mass program in pass 2
MAX_SPLITS = 64  # pass 2 merges the splits of a head as one [splits, Dv] tile
MIN_SPLIT_TILES = 2  # shorter splits cost more in the merge than they gain in parallelism


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
    """Slots per split, from the multiprocessor count and the slot count: about two (sequence, KV
    head, split) programs per multiprocessor, at most `MAX_SPLITS` splits, none shorter than
    `MIN_SPLIT_TILES` tiles, whole tiles each."""
    tiles = triton.cdiv(max(slots, 1), BLOCK_N)
    wanted = triton.cdiv(2 * multiprocessors(device), max(1, batch_heads))
    splits = max(1, min(wanted, MAX_SPLITS, tiles // MIN_SPLIT_TILES))
    return triton.cdiv(tiles, splits) * BLOCK_N


def split_count(slots: int, split_size: int) -> int:
    return max(1, triton.cdiv(slots, split_size))


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
    check_attention_operands(query, key, value, slot_valid, query_valid)
    require_kernel_operands(query, key=key, value=value, slot_valid=slot_valid)
    batch, q_heads, q_len, dim = query.shape
    _, kv_heads, slots, _ = key.shape
    value_dim = value.shape[-1]
    if q_len != 1:
        raise ValueError(f"decode_attention takes one query token per sequence, got {q_len}")
    group = q_heads // kv_heads
    want_mass = weights is not None
    if want_mass and weights.numel() != 1:
        raise ValueError(f"weights must hold one value (the weight of the query row), got {weights.numel()}")
    if scores is not None and (not want_mass or scores.dtype != torch.float32 or not scores.is_contiguous()
                               or scores.shape != key.shape[:3]):
        raise ValueError(f"scores must be a contiguous fp32 {tuple(key.shape[:3])} buffer and needs weights")
    if split_size is not None and split_size < 1:
        raise ValueError(f"split_size must be a positive number of slots, got {split_size}")
    device = query.device
    split = split_size or default_split_size(batch * kv_heads, slots, device)
    split = triton.cdiv(split, BLOCK_N) * BLOCK_N
    num_splits = split_count(slots, split)
    if num_splits > MAX_SPLITS:
        raise ValueError(f"split_size must be at least S / {MAX_SPLITS} = {triton.cdiv(slots, MAX_SPLITS)} slots "
                         f"(at most {MAX_SPLITS} splits), got {split_size}")
    rows = batch * q_heads
    output = torch.empty(batch, 1, q_heads, value_dim, device=device, dtype=query.dtype) if want_output else None
    mass = None
    if want_mass:
        mass = scores if scores is not None else torch.empty(batch, kv_heads, slots, device=device,
                                                             dtype=torch.float32)
    if rows == 0:
        return output, mass
    part_max = torch.empty(rows, num_splits, device=device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    part_out = torch.empty(rows, num_splits, value_dim, device=device, dtype=torch.float32) if want_output \
        else part_max
    logits = torch.empty(rows, slots, device=device, dtype=torch.float32) if want_mass else part_max
    valid = slot_valid.view(torch.uint8)
    qvalid = query_valid.view(torch.uint8) if query_valid is not None else valid
    weights = weights.float() if want_mass else part_max
    block_d, block_dv = max(16, next_power_of_2(dim)), max(16, next_power_of_2(value_dim))
    out_programs = group if want_output else 0
    stages = pipeline_stages(BLOCK_N * (block_d + block_dv) * key.element_size(), 0, shared_memory_limit(device))

    with on_device_of(query):
        _decode_split_kernel[(batch * kv_heads, num_splits)](
            query, key, value, valid, part_max, part_sum, part_out, logits,
            query.stride(0), query.stride(1), query.stride(3),
            key.stride(0), key.stride(1), key.stride(2), key.stride(3),
            value.stride(0), value.stride(1), value.stride(2), value.stride(3),
            valid.stride(0), valid.stride(1), valid.stride(2),
            kv_heads, slots, split, num_splits, float(scaling), float(softcap or 1.0),
            GROUP=group, HEAD_DIM=dim, VALUE_DIM=value_dim,
            BLOCK_G=max(16, next_power_of_2(group)),  # tl.dot needs 16 rows
            BLOCK_N=BLOCK_N, BLOCK_D=block_d, BLOCK_DV=block_dv,
            HAS_SOFTCAP=softcap is not None, WANT_OUTPUT=want_output, WANT_MASS=want_mass,
            **kernel_flags(query.dtype), num_stages=stages,
        )
        mass_blocks = triton.cdiv(slots, MASS_BLOCK) if want_mass else 0
        _decode_combine_kernel[(batch * kv_heads, out_programs + mass_blocks)](
            part_max, part_sum, part_out, logits, output if want_output else part_max,
            mass if want_mass else part_max, weights, qvalid,
            *((output.stride(0), output.stride(2), output.stride(3)) if want_output else (0, 0, 0)),
            qvalid.stride(0) if query_valid is not None else 0,
            kv_heads, slots, num_splits, out_programs, float(decay),
            GROUP=group, VALUE_DIM=value_dim, BLOCK_G=next_power_of_2(group),
            BLOCK_SPLITS=max(16, next_power_of_2(num_splits)), BLOCK_DV=block_dv, MASS_BLOCK=MASS_BLOCK,
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
    triton_ok = pick_triton(backend, query, key=key, value=value, slot_valid=slot_valid)
    run = decode_attention_triton if triton_ok else decode_attention_reference
    return run(query, key, value, slot_valid, scaling=scaling, softcap=softcap, query_valid=query_valid,
               weights=weights, scores=scores, decay=decay, want_output=want_output, split_size=split_size)


if HAS_TRITON:
    from kvpress.triton_kernels.online_softmax import online_softmax_step, tile_logits

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
        """One (sequence, KV head, split): online softmax of the G query heads over the split's slots;
        writes per head the running max, the sum of exponentials and the unnormalised output."""
        bh = tl.program_id(0).to(tl.int64)  # int64: offsets pass 2**31 elements on large caches
        split = tl.program_id(1)
        b = bh // kv_heads
        h = bh % kv_heads
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        t = tl.arange(0, BLOCK_N)
        g_ok = g < GROUP
        q_ptrs = Q + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=g_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        start = split * split_size
        stop = tl.minimum(start + split_size, slots)
        # tile pointers advance by BLOCK_N rows: only the int64 base carries the large offsets
        k_ptrs = K + b * stride_kb + h * stride_kh + start.to(tl.int64) * stride_ks \
            + t[:, None] * stride_ks + d[None, :] * stride_kd
        v_ptrs = V + b * stride_vb + h * stride_vh + start.to(tl.int64) * stride_vs \
            + t[:, None] * stride_vs + dv[None, :] * stride_vd
        m_base = VALID + b * stride_mb + h * stride_mh
        row = bh * GROUP + g  # query head rows of the scratch buffers

        run_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        for n0 in range(start, stop, BLOCK_N):
            n = n0 + t
            n_ok = n < stop
            k = tl.load(k_ptrs, mask=n_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tile_logits(q, k, scaling, softcap, HAS_SOFTCAP, DOT_PRECISION)  # [BLOCK_G, BLOCK_N]
            slot_ok = n_ok & (tl.load(m_base + n * stride_ms, mask=n_ok, other=0) != 0)
            s = tl.where(slot_ok[None, :], s, float("-inf"))
            if WANT_MASS:
                tl.store(LOGITS + row[:, None] * slots + n[None, :], s, mask=g_ok[:, None] & n_ok[None, :])
            run_max, run_sum, acc = online_softmax_step(s, run_max, run_sum, acc, v_ptrs,
                                                        n_ok[:, None] & (dv < VALUE_DIM)[None, :],
                                                        WANT_OUTPUT, UPCAST, DOT_PRECISION)
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_vs
        tl.store(PART_MAX + row * num_splits + split, run_max, mask=g_ok)
        tl.store(PART_SUM + row * num_splits + split, run_sum, mask=g_ok)
        if WANT_OUTPUT:
            out_ptrs = PART_OUT + (row[:, None] * num_splits + split) * VALUE_DIM + dv[None, :]
            tl.store(out_ptrs, acc, mask=g_ok[:, None] & (dv < VALUE_DIM)[None, :])

    @triton.jit
    def _decode_combine_kernel(
        PART_MAX, PART_SUM, PART_OUT, LOGITS, OUT, MASS, WEIGHTS, QUERY_VALID,
        stride_ob, stride_oh, stride_od,
        stride_qvb,
        kv_heads, slots, num_splits, out_programs, decay,
        GROUP: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
        BLOCK_DV: tl.constexpr, MASS_BLOCK: tl.constexpr,
        WANT_OUTPUT: tl.constexpr, WANT_MASS: tl.constexpr, HAS_QUERY_VALID: tl.constexpr,
        ACCUMULATE: tl.constexpr,
    ):
        """Grid (sequence x KV head, G output programs + mass blocks). Output program `g`: the
        output of query head `g` of the group, its splits merged as one `[splits, Dv]` tile,
        `sum_j exp(m_j - m) o_j / sum_j exp(m_j - m) l_j`. Mass block: per slot,
        `sum_g exp(logit_g - lse_g)` with each head's `lse = m + log sum_j exp(m_j - m) l_j`."""
        bh = tl.program_id(0).to(tl.int64)
        task = tl.program_id(1)
        b = bh // kv_heads
        j = tl.arange(0, BLOCK_SPLITS)
        j_ok = j < num_splits
        keep = 1.0
        if HAS_QUERY_VALID:
            keep = (tl.load(QUERY_VALID + b * stride_qvb) != 0).to(tl.float32)

        if task < out_programs:
            if WANT_OUTPUT:
                row = bh * GROUP + task
                part_max = tl.load(PART_MAX + row * num_splits + j, mask=j_ok, other=float("-inf"))
                part_sum = tl.load(PART_SUM + row * num_splits + j, mask=j_ok, other=0.0)
                top = tl.max(part_max, axis=0)
                top = tl.where(top == float("-inf"), 0.0, top)
                rescale = tl.exp(part_max - top)  # [BLOCK_SPLITS]
                total = tl.sum(part_sum * rescale, axis=0)
                dv = tl.arange(0, BLOCK_DV)
                dv_ok = dv < VALUE_DIM
                parts = tl.load(PART_OUT + (row * num_splits + j)[:, None] * VALUE_DIM + dv[None, :],
                                mask=j_ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_SPLITS, BLOCK_DV]
                out = tl.sum(parts * rescale[:, None], axis=0)
                out = out * tl.where(total > 0.0, keep / tl.where(total > 0.0, total, 1.0), 0.0)
                h_q = (bh % kv_heads) * GROUP + task
                tl.store(OUT + b * stride_ob + h_q * stride_oh + dv * stride_od, out.to(OUT.dtype.element_ty),
                         mask=dv_ok)
        else:
            if WANT_MASS:  # names differ from the output branch: Triton types each name once per if/else
                g = tl.arange(0, BLOCK_G)
                g_ok = g < GROUP
                rows = bh * GROUP + g
                cells = rows[:, None] * num_splits + j[None, :]
                cells_ok = g_ok[:, None] & j_ok[None, :]
                head_max = tl.load(PART_MAX + cells, mask=cells_ok, other=float("-inf"))
                head_sum = tl.load(PART_SUM + cells, mask=cells_ok, other=0.0)
                head_top = tl.max(head_max, axis=1)
                head_top = tl.where(head_top == float("-inf"), 0.0, head_top)
                head_total = tl.sum(head_sum * tl.exp(head_max - head_top[:, None]), axis=1)  # [BLOCK_G]
                seen = head_total > 0.0
                lse = tl.where(seen, head_top + tl.log(tl.where(seen, head_total, 1.0)), float("inf"))
                n = (task - out_programs) * MASS_BLOCK + tl.arange(0, MASS_BLOCK)
                n_ok = n < slots
                s = tl.load(LOGITS + rows[:, None] * slots + n[None, :], mask=g_ok[:, None] & n_ok[None, :],
                            other=float("-inf"))
                mass = tl.sum(tl.exp(s - lse[:, None]), axis=0) * (tl.load(WEIGHTS) * keep)  # [MASS_BLOCK]
                mass_ptrs = MASS + bh * slots + n
                if ACCUMULATE:
                    mass += tl.load(mass_ptrs, mask=n_ok, other=0.0) * decay
                tl.store(mass_ptrs, mass, mask=n_ok)
