"""Per-key attention mass of a block of queries, in O(n) memory per head, and the attention forward
that produces the row log-sum-exp it needs.

Layout (as `kvpress.reference_attention`): the `q` queries are the last `q` of the layer's `S` slots, so query
`i` may attend slot `s` iff `slot_valid[s]` and `s <= S - q + i`. With the row log-sum-exp
`lse[i] = log sum_s exp(l_is)` of the logits `l_is = q_i . k_s * scaling` (soft-capped when asked),

    mass[b, h, s] = sum_{g in group(h)} sum_i weights[i] * query_valid[b, i] * exp(l_is - lse[i])

which is the H2O column sum (all rows, weight 1), SnapKV's window vote (the caller passes the last
`w` rows), TOVA's last row, or A2SF's decayed sum (weights `decay ** age`). No `q x S` tensor exists:

- `attention_with_lse` is a flash-attention forward (online softmax over slot tiles) returning the
  output `[B, q, Hq, Dv]` and `lse [B, Hq, q]`; with `want_output=False` it skips the values and
  returns only the log-sum-exp (the first pass when no attention kernel supplied one).
- `prefill_mass` runs one program per (KV head, tile of slots): it loads its key tile once, loops
  over the group's query heads and over the query tiles that can see the tile (causality skips the
  rest), recomputes the logits, and sums `exp(l - lse)` down the columns: no atomics, every slot
  written once.

A row that sees no valid slot has `lse = +inf`: it outputs zeros and adds no mass.
"""

from __future__ import annotations

import torch

from kvpress.triton_kernels._common import (
    HAS_TRITON,
    check_attention_operands,
    interpreting,
    kernel_flags,
    next_power_of_2,
    on_device_of,
    pick_triton,
    require_kernel_operands,
    shared_memory_limit,
    tl,
    triton,
)

ROW_CHUNK_ELEMENTS = 1 << 24  # fp32 logits one reference chunk may hold
INTERPRETER_BLOCKS = (32, 32)  # (BLOCK_M, BLOCK_N) under TRITON_INTERPRET=1: few programs, fast tests


def _chunked_logits(query, key, slot_valid, scaling, softcap, start, stop):
    """Reference helper: masked logits `[B, Hkv, G, stop-start, S]` fp32 of query rows [start, stop)."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    qf = query[:, :, start:stop].float().reshape(batch, kv_heads, q_heads // kv_heads, stop - start, dim)
    logits = torch.einsum("bhgqd,bhsd->bhgqs", qf, key.float()) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    last = slots - q_len + torch.arange(start, stop, device=key.device)  # [c] slot of each row
    allowed = slot_valid[:, :, None, None, :] & (torch.arange(slots, device=key.device) <= last[:, None])
    return logits.masked_fill(~allowed, float("-inf"))


def _row_chunk(query, key) -> int:
    return max(1, ROW_CHUNK_ELEMENTS // max(1, query.shape[0] * query.shape[1] * key.shape[2]))


def attention_with_lse_reference(
    query: torch.Tensor,  # [B, Hq, q, D]
    key: torch.Tensor,  # [B, Hkv, S, D]
    value: torch.Tensor,  # [B, Hkv, S, Dv]
    slot_valid: torch.Tensor,  # [B, Hkv, S] bool
    *,
    scaling: float,
    softcap: float | None = None,
    query_valid: torch.Tensor | None = None,  # [B, q] bool: False rows output zeros
    want_output: bool = True,
    blocks: tuple[int, int] | None = None,  # Triton's tile sizes; ignored here
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """PyTorch reference: `(output [B, q, Hq, Dv] | None, lse [B, Hq, q] fp32)`, row chunks of
    `O(chunk * S)` memory."""
    batch, q_heads, q_len, _ = query.shape
    chunk = _row_chunk(query, key)
    outputs, lses = [], []
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        logits = _chunked_logits(query, key, slot_valid, scaling, softcap, start, stop)
        lse = torch.logsumexp(logits, dim=-1)  # [B, Hkv, G, c]
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
        lses.append(lse.reshape(batch, q_heads, stop - start))
        if want_output:
            probs = torch.exp(logits - lse[..., None])
            if query_valid is not None:
                probs = probs * query_valid[:, None, None, start:stop, None]
            outputs.append(torch.einsum("bhgqs,bhsd->bhgqd", probs, value.float()))
    output = None
    if want_output:
        output = torch.cat(outputs, dim=3).reshape(batch, q_heads, q_len, -1).transpose(1, 2)
        output = output.to(query.dtype).contiguous()
    return output, torch.cat(lses, dim=-1)


def prefill_mass_reference(
    query: torch.Tensor,  # [B, Hq, q, D]
    key: torch.Tensor,  # [B, Hkv, S, D]
    slot_valid: torch.Tensor,  # [B, Hkv, S] bool
    *,
    scaling: float,
    softcap: float | None = None,
    query_valid: torch.Tensor | None = None,  # [B, q] bool: False rows add no mass
    weights: torch.Tensor,  # [q] fp32 weight of each query row
    lse: torch.Tensor | None = None,  # [B, Hq, q] fp32 row log-sum-exp; None: computed here
    blocks: tuple[int, int] | None = None,  # Triton's tile sizes; ignored here
) -> torch.Tensor:
    """PyTorch reference: `mass [B, Hkv, S]` fp32 (module docstring), row chunks of `O(chunk * S)`."""
    batch, _q_heads, q_len, _ = query.shape
    kv_heads = key.shape[1]
    chunk = _row_chunk(query, key)
    mass = torch.zeros(batch, kv_heads, key.shape[2], device=key.device, dtype=torch.float32)
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        logits = _chunked_logits(query, key, slot_valid, scaling, softcap, start, stop)
        if lse is None:
            row_lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            row_lse = torch.where(torch.isneginf(row_lse), torch.full_like(row_lse, float("inf")), row_lse)
        else:
            row_lse = lse[:, :, start:stop].reshape(batch, kv_heads, -1, stop - start, 1)
        row_weight = weights[start:stop].float().expand(batch, stop - start)
        if query_valid is not None:
            row_weight = row_weight * query_valid[:, start:stop]
        mass += torch.einsum("bhgqs,bq->bhs", torch.exp(logits - row_lse), row_weight)
    return mass


def _tiles(blocks):
    return blocks or (INTERPRETER_BLOCKS if interpreting() else None)


def length_bucket(length: int) -> int:
    """Autotune key for a length: its power of two (at least 64), so a prefill chunked into many
    lengths tunes once per bucket, not once per length, and 1k and 32k tokens tune apart."""
    return max(64, next_power_of_2(length))


def _check(query, key, value, slot_valid, query_valid, blocks):
    check_attention_operands(query, key, value, slot_valid, query_valid)
    require_kernel_operands(query, key=key, value=value, slot_valid=slot_valid)
    if not 1 <= query.shape[2] <= key.shape[2]:
        raise ValueError(f"the q queries are the last slots of the layer: q must be in [1, S={key.shape[2]}], "
                         f"got {query.shape[2]}")
    if blocks is not None and not all(b >= 16 and next_power_of_2(b) == b for b in blocks):
        raise ValueError(f"blocks must be two powers of two >= 16 (tl.dot tiles), got {blocks}")


MAX_ACCUMULATOR_PER_THREAD = 64  # fp32 values: beyond, ptxas spills on sm_80 (tests/kernels/test_compile.py)


def fitting_configs(configs, kind: str, element_size: int, block_d: int, block_dv: int, shared_limit: int):
    """The autotune configurations that fit a target: estimated shared memory (`num_stages`
    pipelined tiles plus the resident one) within `shared_limit`, and at most
    `MAX_ACCUMULATOR_PER_THREAD` fp32 accumulator values per thread. `kind`: "attention" (key and
    value tiles stream, the query tile stays, the accumulator is `[BLOCK_M, Dv]`) or "mass" (query
    tiles stream, the key tile stays, the accumulator is `[BLOCK_M, BLOCK_N]`). Never empty: with
    no fit, the configuration of least shared memory."""
    footprint = lambda config: config_footprint(config, kind, element_size, block_d, block_dv)
    kept = [c for c in configs if footprint(c)[0] <= shared_limit and footprint(c)[1] <= MAX_ACCUMULATOR_PER_THREAD]
    return kept or [min(configs, key=footprint)]


def config_footprint(config, kind: str, element_size: int, block_d: int, block_dv: int) -> tuple[int, float]:
    """(estimated shared memory in bytes, fp32 accumulator values per thread) of an autotune
    configuration; see `fitting_configs`."""
    m, n, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    if kind == "attention":
        return (stages * n * (block_d + block_dv) + m * block_d) * element_size, m * block_dv / (32 * config.num_warps)
    return (stages * m * block_d + n * block_d) * element_size, m * n / (32 * config.num_warps)


def attention_with_lse_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_valid: torch.Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    query_valid: torch.Tensor | None = None,
    want_output: bool = True,
    blocks: tuple[int, int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Triton launcher; same contract as `attention_with_lse_reference`."""
    _check(query, key, value, slot_valid, query_valid, blocks)
    batch, q_heads, q_len, dim = query.shape
    _, kv_heads, slots, _ = key.shape
    value_dim = value.shape[-1]
    device = query.device
    lse = torch.empty(batch, q_heads, q_len, device=device, dtype=torch.float32)
    output = torch.empty(batch, q_len, q_heads, value_dim, device=device, dtype=query.dtype) if want_output \
        else lse
    valid = slot_valid.view(torch.uint8)
    qvalid = query_valid.view(torch.uint8) if query_valid is not None else valid
    args = (
        query, key, value, valid, qvalid, output, lse,
        *query.stride(), *key.stride(), *value.stride(), *valid.stride(),
        *(qvalid.stride() if query_valid is not None else (0, 0)),
        *(output.stride() if want_output else (0, 0, 0, 0)),
        kv_heads, q_heads, q_len, slots, float(scaling), float(softcap or 1.0),
        length_bucket(q_len), length_bucket(slots),
    )
    meta = dict(
        GROUP=q_heads // kv_heads, HEAD_DIM=dim, VALUE_DIM=value_dim,
        BLOCK_D=max(16, next_power_of_2(dim)), BLOCK_DV=max(16, next_power_of_2(value_dim)),
        HAS_SOFTCAP=softcap is not None, HAS_QUERY_VALID=query_valid is not None, WANT_OUTPUT=want_output,
        **kernel_flags(query.dtype),
    )
    tiles = _tiles(blocks)
    with on_device_of(query):
        if tiles is None:
            grid = lambda conf: (triton.cdiv(q_len, conf["BLOCK_M"]), batch * q_heads)
            _attention_lse_tuned[grid](*args, **meta)
        else:
            grid = (triton.cdiv(q_len, tiles[0]), batch * q_heads)
            _attention_lse_kernel[grid](*args, **meta, BLOCK_M=tiles[0], BLOCK_N=tiles[1])
    return (output if want_output else None), lse


def prefill_mass_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    slot_valid: torch.Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    query_valid: torch.Tensor | None = None,
    weights: torch.Tensor,
    lse: torch.Tensor | None = None,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Triton launcher; same contract as `prefill_mass_reference`. Without `lse`, runs the
    log-sum-exp pass of `attention_with_lse_triton` first."""
    _check(query, key, key, slot_valid, query_valid, blocks)
    batch, q_heads, q_len, dim = query.shape
    if weights.shape != (q_len,):
        raise ValueError(f"weights must be [q={q_len}], one weight per query row, got {tuple(weights.shape)}")
    if lse is not None and lse.shape != (batch, q_heads, q_len):
        raise ValueError(f"lse must be [{batch}, {q_heads}, {q_len}], got {tuple(lse.shape)}")
    _, kv_heads, slots, _ = key.shape
    if lse is None:
        _, lse = attention_with_lse_triton(query, key, key, slot_valid, scaling=scaling, softcap=softcap,
                                           want_output=False, blocks=blocks)
    lse = lse.float()
    weights = weights.float().contiguous()
    mass = torch.empty(batch, kv_heads, slots, device=query.device, dtype=torch.float32)
    valid = slot_valid.view(torch.uint8)
    qvalid = query_valid.view(torch.uint8) if query_valid is not None else valid
    args = (
        query, key, valid, qvalid, weights, lse, mass,
        *query.stride(), *key.stride(), *valid.stride(),
        *(qvalid.stride() if query_valid is not None else (0, 0)), *lse.stride(),
        kv_heads, q_len, slots, float(scaling), float(softcap or 1.0),
        length_bucket(q_len), length_bucket(slots),
    )
    meta = dict(
        GROUP=q_heads // kv_heads, HEAD_DIM=dim, BLOCK_D=max(16, next_power_of_2(dim)),
        HAS_SOFTCAP=softcap is not None, HAS_QUERY_VALID=query_valid is not None, **kernel_flags(query.dtype),
    )
    tiles = _tiles(blocks)
    with on_device_of(query):
        if tiles is None:
            grid = lambda conf: (triton.cdiv(slots, conf["BLOCK_N"]), batch * kv_heads)
            _prefill_mass_tuned[grid](*args, **meta)
        else:
            grid = (triton.cdiv(slots, tiles[1]), batch * kv_heads)
            _prefill_mass_kernel[grid](*args, **meta, BLOCK_M=tiles[0], BLOCK_N=tiles[1])
    return mass


def attention_with_lse(query, key, value, slot_valid, *, scaling, softcap=None, query_valid=None,
                       want_output=True, blocks=None, backend: str = "auto"):
    """Attention output and row log-sum-exp: the Triton launcher on CUDA, the reference elsewhere."""
    triton_ok = pick_triton(backend, query, key=key, value=value, slot_valid=slot_valid)
    run = attention_with_lse_triton if triton_ok else attention_with_lse_reference
    return run(query, key, value, slot_valid, scaling=scaling, softcap=softcap, query_valid=query_valid,
               want_output=want_output, blocks=blocks)


def prefill_mass(query, key, slot_valid, *, scaling, softcap=None, query_valid=None, weights, lse=None,
                 blocks=None, backend: str = "auto"):
    """Per-slot attention mass of a block of queries: the Triton launcher on CUDA, the reference elsewhere."""
    run = prefill_mass_triton if pick_triton(backend, query, key=key, slot_valid=slot_valid) else prefill_mass_reference
    return run(query, key, slot_valid, scaling=scaling, softcap=softcap, query_valid=query_valid,
               weights=weights, lse=lse, blocks=blocks)


if HAS_TRITON:
    from kvpress.triton_kernels.online_softmax import online_softmax_step, tile_logits

    @triton.jit(do_not_specialize=["q_bucket", "s_bucket"])
    def _attention_lse_kernel(
        Q, K, V, VALID, QUERY_VALID, OUT, LSE,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_mb, stride_mh, stride_ms,
        stride_qvb, stride_qvm,
        stride_ob, stride_om, stride_oh, stride_od,
        kv_heads, q_heads, q_len, slots, scaling, softcap,
        q_bucket, s_bucket,  # autotune key only (length_bucket)
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_QUERY_VALID: tl.constexpr, WANT_OUTPUT: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One (tile of query rows, sequence, query head): online softmax over the visible slots;
        `out_i = sum_s softmax_i(s) v_s` and `lse_i = log sum_s exp(l_is)`."""
        tile = tl.program_id(0)
        bhq = tl.program_id(1).to(tl.int64)  # int64: offsets pass 2**31 elements on large batches
        b = bhq // q_heads
        hq = bhq % q_heads
        h = hq // GROUP
        r = tl.arange(0, BLOCK_M)
        t = tl.arange(0, BLOCK_N)
        i = tile * BLOCK_M + r
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        i_ok = i < q_len
        offset = slots - q_len
        first = (tile * BLOCK_M).to(tl.int64)
        q = tl.load(Q + b * stride_qb + hq * stride_qh + first * stride_qm + r[:, None] * stride_qm
                    + d[None, :] * stride_qd, mask=i_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        k_ptrs = K + b * stride_kb + h * stride_kh + t[:, None] * stride_ks + d[None, :] * stride_kd
        v_ptrs = V + b * stride_vb + h * stride_vh + t[:, None] * stride_vs + dv[None, :] * stride_vd
        m_base = VALID + b * stride_mb + h * stride_mh

        run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        stop = tl.minimum(slots, offset + (tile + 1) * BLOCK_M)  # causal: the tile's last row sees no further
        for n0 in range(0, stop, BLOCK_N):
            n = n0 + t
            n_ok = n < slots
            k = tl.load(k_ptrs, mask=n_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tile_logits(q, k, scaling, softcap, HAS_SOFTCAP, DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            slot_ok = n_ok & (tl.load(m_base + n * stride_ms, mask=n_ok, other=0) != 0)
            allowed = slot_ok[None, :] & (n[None, :] <= offset + i[:, None])
            s = tl.where(allowed, s, float("-inf"))
            run_max, run_sum, acc = online_softmax_step(s, run_max, run_sum, acc, v_ptrs,
                                                        n_ok[:, None] & (dv < VALUE_DIM)[None, :],
                                                        WANT_OUTPUT, UPCAST, DOT_PRECISION)
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_vs

        seen = run_sum > 0.0
        safe_sum = tl.where(seen, run_sum, 1.0)
        top = tl.where(run_max == float("-inf"), 0.0, run_max)
        lse = tl.where(seen, top + tl.log(safe_sum), float("inf"))
        tl.store(LSE + bhq * q_len + i, lse, mask=i_ok)
        if WANT_OUTPUT:
            scale = tl.where(seen, 1.0 / safe_sum, 0.0)
            if HAS_QUERY_VALID:
                keep = tl.load(QUERY_VALID + b * stride_qvb + i * stride_qvm, mask=i_ok, other=0) != 0
                scale = tl.where(keep, scale, 0.0)
            out = acc * scale[:, None]
            out_ptrs = OUT + b * stride_ob + first * stride_om + r[:, None] * stride_om + hq * stride_oh \
                + dv[None, :] * stride_od
            tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=i_ok[:, None] & (dv < VALUE_DIM)[None, :])

    @triton.jit(do_not_specialize=["q_bucket", "s_bucket"])
    def _prefill_mass_kernel(
        Q, K, VALID, QUERY_VALID, WEIGHTS, LSE, MASS,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_mb, stride_mh, stride_ms,
        stride_qvb, stride_qvm,
        stride_lb, stride_lh, stride_lm,
        kv_heads, q_len, slots, scaling, softcap,
        q_bucket, s_bucket,  # autotune key only (length_bucket)
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_QUERY_VALID: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One (tile of slots, sequence, KV head): `mass_s = sum_g sum_i w_i exp(l_is - lse_i)` over
        the group's heads and the query rows that can see the tile. The weighted probabilities
        accumulate as a `[BLOCK_M, BLOCK_N]` tile, summed over rows once at the end."""
        tile = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // kv_heads
        h = bh % kv_heads
        r = tl.arange(0, BLOCK_M)
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        n_ok = n < slots
        offset = slots - q_len
        k = tl.load(K + b * stride_kb + h * stride_kh + (tile * BLOCK_N).to(tl.int64) * stride_ks
                    + tl.arange(0, BLOCK_N)[:, None] * stride_ks + d[None, :] * stride_kd,
                    mask=n_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        slot_ok = n_ok & (tl.load(VALID + b * stride_mb + h * stride_mh + n * stride_ms, mask=n_ok, other=0) != 0)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        first_row = tl.maximum(tile * BLOCK_N - offset, 0)  # earlier rows cannot see this tile
        first_row = (first_row // BLOCK_M) * BLOCK_M
        for g in range(GROUP):
            hq = h * GROUP + g
            q_ptrs = Q + b * stride_qb + hq * stride_qh + first_row.to(tl.int64) * stride_qm \
                + r[:, None] * stride_qm + d[None, :] * stride_qd
            l_base = LSE + b * stride_lb + hq * stride_lh
            for m0 in range(first_row, q_len, BLOCK_M):
                i = m0 + r
                i_ok = i < q_len
                q = tl.load(q_ptrs, mask=i_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                lse = tl.load(l_base + i * stride_lm, mask=i_ok, other=float("inf"))
                row_weight = tl.load(WEIGHTS + i, mask=i_ok, other=0.0)
                if HAS_QUERY_VALID:
                    keep = tl.load(QUERY_VALID + b * stride_qvb + i * stride_qvm, mask=i_ok, other=0) != 0
                    row_weight = tl.where(keep, row_weight, 0.0)
                s = tile_logits(q, k, scaling, softcap, HAS_SOFTCAP, DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
                allowed = slot_ok[None, :] & (n[None, :] <= offset + i[:, None])
                acc += tl.where(allowed, tl.exp(s - lse[:, None]), 0.0) * row_weight[:, None]
                q_ptrs += BLOCK_M * stride_qm
        tl.store(MASS + bh * slots + n, tl.sum(acc, axis=0), mask=n_ok)

    def _configs(pairs):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]

    # the last two attention tiles exist for head dim 256 (see fitting_configs)
    ATTENTION_CONFIGS = _configs([(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 4),
                                  (64, 32, 8, 3), (64, 64, 8, 2)])
    MASS_CONFIGS = _configs([(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (32, 64, 4, 4)])

    def _prune(kind):
        def prune(configs, named_args, **kwargs):
            query = named_args["Q"]
            return fitting_configs(configs, kind, query.element_size(), kwargs["BLOCK_D"],
                                   kwargs.get("BLOCK_DV", kwargs["BLOCK_D"]), shared_memory_limit(query.device))
        return {"early_config_prune": prune}

    _attention_lse_tuned = triton.autotune(
        configs=ATTENTION_CONFIGS, key=["GROUP", "HEAD_DIM", "VALUE_DIM", "WANT_OUTPUT", "q_bucket", "s_bucket"],
        prune_configs_by=_prune("attention"),
    )(_attention_lse_kernel)
    _prefill_mass_tuned = triton.autotune(
        configs=MASS_CONFIGS, key=["GROUP", "HEAD_DIM", "q_bucket", "s_bucket"], prune_configs_by=_prune("mass"),
    )(_prefill_mass_kernel)
