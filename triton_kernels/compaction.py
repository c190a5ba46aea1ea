"""Compaction of a pruned layer: gather the kept slots of every per-slot tensor in one launch.

After a policy selects `indices [B, Hkv, K]` (ascending, so physical order stays temporal), the layer
keeps `keys[..., indices, :]`, `values[..., indices, :]`, `positions[..., indices]`,
`scores[..., indices]` and, when given, `valid[..., indices]`. PyTorch does this with one `gather`
per tensor (four or five launches, each re-reading the indices); the kernel reads each index once
and copies all rows of one (sequence, KV head, tile of kept slots) in one program.
"""

from __future__ import annotations

import torch

from kvpress.triton_kernels._common import (
    HAS_TRITON,
    interpreting,
    next_power_of_2,
    on_device_of,
    tl,
    triton,
    use_triton,
)

BLOCK_K = 32  # kept slots per program


def compact_slots_reference(
    keys: torch.Tensor,  # [B, Hkv, P, D]
    values: torch.Tensor,  # [B, Hkv, P, Dv]
    positions: torch.Tensor,  # [B, Hkv, P] long
    scores: torch.Tensor,  # [B, Hkv, P] fp32
    indices: torch.Tensor,  # [B, Hkv, K] long, slots to keep
    valid: torch.Tensor | None = None,  # [B, Hkv, P] bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """PyTorch reference: the kept `(keys, values, positions, scores, valid | None)`, slot axis `K`."""
    expand = indices[..., None]
    kept_keys = keys.gather(2, expand.expand(-1, -1, -1, keys.shape[-1]))
    kept_values = values.gather(2, expand.expand(-1, -1, -1, values.shape[-1]))
    kept_valid = valid.gather(-1, indices) if valid is not None else None
    return kept_keys, kept_values, positions.gather(-1, indices), scores.gather(-1, indices), kept_valid


def check_indices(keys: torch.Tensor, indices: torch.Tensor) -> None:
    """`indices` must be integer `[B, Hkv, K]` slots in `[0, P)`. The range check reads no value back
    from a GPU: there it is a device-side assertion (as `torch.gather` makes), raised at the next
    synchronisation; the kernel itself never reads outside the tensors."""
    batch, kv_heads, slots = keys.shape[:3]
    if indices.dtype not in (torch.int64, torch.int32) or indices.dim() != 3 \
            or tuple(indices.shape[:2]) != (batch, kv_heads):
        raise ValueError(f"indices must be int64/int32 [B={batch}, Hkv={kv_heads}, K], got {indices.dtype} "
                         f"{tuple(indices.shape)}")
    if indices.device != keys.device:
        raise ValueError(f"indices are on {indices.device} but keys are on {keys.device}")
    message = f"compact_slots: indices must be slots in [0, P={slots})"
    if indices.numel() == 0:
        return
    if indices.is_cuda:
        torch._assert_async(((indices >= 0) & (indices < slots)).all(), message)
    elif int(indices.min()) < 0 or int(indices.max()) >= slots:
        raise ValueError(f"{message}, got values in [{int(indices.min())}, {int(indices.max())}]")


def compact_slots_triton(keys, values, positions, scores, indices, valid=None):
    """Triton launcher; same contract as `compact_slots_reference`."""
    check_indices(keys, indices)
    batch, kv_heads, slots, dim = keys.shape
    value_dim = values.shape[-1]
    kept = indices.shape[-1]
    out_keys = keys.new_empty(batch, kv_heads, kept, dim)
    out_values = values.new_empty(batch, kv_heads, kept, value_dim)
    out_positions = positions.new_empty(batch, kv_heads, kept)
    out_scores = scores.new_empty(batch, kv_heads, kept)
    has_valid = valid is not None
    out_valid = torch.empty(batch, kv_heads, kept, dtype=torch.bool, device=keys.device) if has_valid else None
    src_valid = valid.view(torch.uint8) if has_valid else positions
    dst_valid = out_valid.view(torch.uint8) if has_valid else out_positions
    block_k = 16 if interpreting() else BLOCK_K
    grid = (triton.cdiv(kept, block_k), batch * kv_heads)
    if kept and batch * kv_heads:
        with on_device_of(keys):
            _compact_kernel[grid](
                keys, values, positions, scores, src_valid, indices,
                out_keys, out_values, out_positions, out_scores, dst_valid,
                *keys.stride(), *values.stride(), *positions.stride(), *scores.stride(),
                *(src_valid.stride() if has_valid else (0, 0, 0)), *indices.stride(),
                kv_heads, slots, kept,
                HEAD_DIM=dim, VALUE_DIM=value_dim,
                BLOCK_K=block_k, BLOCK_D=next_power_of_2(dim), BLOCK_DV=next_power_of_2(value_dim),
                HAS_VALID=has_valid,
            )
    return out_keys, out_values, out_positions, out_scores, out_valid


def compact_slots(keys, values, positions, scores, indices, valid=None, *, backend: str = "auto"):
    """Gather the kept slots: the Triton launcher on CUDA, the reference elsewhere."""
    run = compact_slots_triton if use_triton(keys, backend) else compact_slots_reference
    return run(keys, values, positions, scores, indices, valid)


if HAS_TRITON:

    @triton.jit
    def _compact_kernel(
        KEYS, VALUES, POSITIONS, SCORES, VALID, INDICES,
        OUT_KEYS, OUT_VALUES, OUT_POSITIONS, OUT_SCORES, OUT_VALID,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_pb, stride_ph, stride_ps,
        stride_sb, stride_sh, stride_ss,
        stride_mb, stride_mh, stride_ms,
        stride_ib, stride_ih, stride_ik,
        kv_heads, slots, kept,
        HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_VALID: tl.constexpr,
    ):
        """One (tile of kept slots, sequence, KV head): `out[.., j, :] = x[.., indices[j], :]` for every
        per-slot tensor, the indices read once. An index outside `[0, P)` reads and writes nothing (the
        launcher has asserted the range)."""
        tile = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)  # int64: offsets pass 2**31 elements on large caches
        b = bh // kv_heads
        h = bh % kv_heads
        j = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        j_ok = j < kept
        src = tl.load(INDICES + b * stride_ib + h * stride_ih + j * stride_ik, mask=j_ok, other=0).to(tl.int64)
        j_ok = j_ok & (src >= 0) & (src < slots)
        dst = bh * kept + j  # outputs are contiguous [B, Hkv, K, ...]
        d = tl.arange(0, BLOCK_D)
        row = tl.load(KEYS + b * stride_kb + h * stride_kh + src[:, None] * stride_ks + d[None, :] * stride_kd,
                      mask=j_ok[:, None] & (d < HEAD_DIM)[None, :])
        tl.store(OUT_KEYS + dst[:, None] * HEAD_DIM + d[None, :], row, mask=j_ok[:, None] & (d < HEAD_DIM)[None, :])
        dv = tl.arange(0, BLOCK_DV)
        row = tl.load(VALUES + b * stride_vb + h * stride_vh + src[:, None] * stride_vs + dv[None, :] * stride_vd,
                      mask=j_ok[:, None] & (dv < VALUE_DIM)[None, :])
        tl.store(OUT_VALUES + dst[:, None] * VALUE_DIM + dv[None, :], row,
                 mask=j_ok[:, None] & (dv < VALUE_DIM)[None, :])
        position = tl.load(POSITIONS + b * stride_pb + h * stride_ph + src * stride_ps, mask=j_ok)
        tl.store(OUT_POSITIONS + dst, position, mask=j_ok)
        score = tl.load(SCORES + b * stride_sb + h * stride_sh + src * stride_ss, mask=j_ok)
        tl.store(OUT_SCORES + dst, score, mask=j_ok)
        if HAS_VALID:
            flag = tl.load(VALID + b * stride_mb + h * stride_mh + src * stride_ms, mask=j_ok)
            tl.store(OUT_VALID + dst, flag, mask=j_ok)
