"""SnapKV: observation-window attention, pooled."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvpress.policy import DECODE, AttentionRequest, Policy
from kvpress.selection import valid_first_order


@dataclass
class SnapKV(Policy):
    """Score each prompt slot by the attention of the last `window` prompt queries, smoothed by 1-D
    pooling over neighbouring slots (`kernel`, stride 1, same padding; "max" or "avg"); keep the top
    `budget - window` plus the window.

    Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469.
    Paper LongBench setting: window 32, kernel 7, max pooling (defaults here).
    The paper compresses the prompt only. So that a generation of any length stays within the
    budget, here the decoding steps add their attention row to the score and evict when the layer
    exceeds budget + the cache's slack [our choice, documented in docs/policies.md].
    """

    spec_name = "snapkv"

    budget: int | float = 1024
    window: int = 32
    kernel: int = 7
    pooling: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"SnapKV: pooling must be 'max' or 'avg', got {self.pooling!r}")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"SnapKV: kernel must be an odd int >= 1, got {self.kernel!r}")
        if self.window < 1:
            raise ValueError(f"SnapKV: window must be >= 1 (the observation window), got {self.window}")

    def request(self, phase: str) -> AttentionRequest:
        if phase == DECODE:
            return AttentionRequest(rows=None, accumulate=True)
        return AttentionRequest(rows=self.window, accumulate=False)

    def score(self, layer) -> torch.Tensor:
        return pool_slots(self.raw_scores(layer), self.kernel, self.pooling, layer.valid)


def pool_slots(scores: torch.Tensor, kernel: int, pooling: str, valid: torch.Tensor | None = None) -> torch.Tensor:
    """1-D pooling along the slot axis of `[B, H, S]` scores, same length out. With `valid`, the pool runs
    over the neighbouring slots that hold a token, in slot (temporal) order: padding and slots dropped
    in place while decoding (whose stale score stays in the buffer) are skipped, so the result does not
    depend on whether dropped slots were squeezed out yet."""
    if kernel == 1:
        return scores
    if valid is None:
        return _pool(scores, kernel, pooling)
    order = valid_first_order(valid)
    if pooling == "max":  # holes filled before the gather: the packed validity is not needed
        packed = scores.masked_fill(valid.logical_not(), torch.finfo(scores.dtype).min).gather(-1, order)
        pooled = _pool(packed, kernel, pooling)
    else:  # average over the valid neighbours only
        packed_valid = valid.gather(-1, order)
        packed = scores.gather(-1, order).masked_fill(~packed_valid, 0.0)
        pooled = _pool(packed, kernel, pooling)
        pooled = pooled / _pool(packed_valid.to(scores.dtype), kernel, "avg").clamp_min(torch.finfo(scores.dtype).tiny)
    return torch.empty_like(pooled).scatter_(-1, order, pooled)


def _pool(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """Pool `[B, H, S]` along S: the 2-D pool over an unbatched `(C=B, H, W=S)` input with a `(1, kernel)`
    window is the 1-D pool of every (row, head), one op, no reshapes."""
    pool = F.max_pool2d if pooling == "max" else F.avg_pool2d
    if scores.dim() == 3:
        return pool(scores, (1, kernel), stride=1, padding=(0, kernel // 2))
    return pool(scores.reshape(-1, 1, scores.shape[-1]), (1, kernel), stride=1,
                padding=(0, kernel // 2)).reshape(scores.shape)
