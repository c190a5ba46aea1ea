"""The online softmax the attention kernels share: a tile of logits, and its fold into a row state.

Flash attention reads the slots tile by tile and keeps, per query row, the running maximum `m`, the
running sum of exponentials `l` and the unnormalised output `acc`. A tile of logits `s [rows, BLOCK_N]`
(slots a row may not see at -inf) updates them as

    m' = max(m, max_j s_j),   alpha = exp(m - m'),   p_j = exp(s_j - m'),
    l' = l * alpha + sum_j p_j,   acc' = acc * alpha + p @ v

with `m'` read as 0 while a row has seen no valid slot (so `exp` never meets `-inf - -inf`).

- `online_softmax_step` is that update. The decode kernel (`decode_attention.py`: one program per
  split of a KV head's slots, its G query heads as rows) and the prefill attention kernel
  (`prefill_mass.py`: one program per tile of query rows of one head) call it in their slot loops.
  The loops themselves stay in the kernels: they differ in range (a split, or the causal prefix of
  the tile), in masks (slot validity, plus causality in prefill) and in what else they do with the
  logits (decode stores them for its mass pass).
- `tile_logits` is `q k^T * scaling`, soft-capped: the two loops above and the prefill mass kernel
  (which needs `exp(s - lse)` from a known log-sum-exp, not the running state) compute it alike.

Both are `@triton.jit`, decorated in the same import as the kernels that call them, so all are
interpreted under `TRITON_INTERPRET=1` or all compiled (an interpreted kernel cannot call a compiled
helper). The compiler inlines them.
"""

from __future__ import annotations

from kvpress.triton_kernels._common import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def tile_logits(q, k, scaling, softcap, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """`q k^T * scaling` of a query tile `[rows, D]` and a key tile `[BLOCK_N, D]`, soft-capped to
        `tanh(s / c) * c` when asked."""
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scaling  # [rows, BLOCK_N]
        if HAS_SOFTCAP:  # tanh(s / c) * c, written with exp (the interpreter has no tanh)
            s = (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0)) * softcap
        return s

    @triton.jit
    def online_softmax_step(s, run_max, run_sum, acc, v_ptrs, v_mask,
                            WANT_OUTPUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Fold the logits `s [rows, BLOCK_N]` into `(run_max [rows], run_sum [rows], acc [rows, Dv])`
        (module docstring); the value tile is read only when the output is wanted. Returns the new
        state."""
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp(run_max - safe_max)
        p = tl.exp(s - safe_max[:, None])
        run_sum = run_sum * alpha + tl.sum(p, axis=1)
        if WANT_OUTPUT:
            v = tl.load(v_ptrs, mask=v_mask, other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        return new_max, run_sum, acc
