"""SnapKV: observation-window attention, pooled."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvpress.policy import DECODE, AttentionRequest, Policy


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
    """1-D pooling along the slot axis of `[B, H, S]` scores, same length out. With `valid`, slots that
    hold no token (padding, slots dropped while decoding whose old score stays in place) take no part:
    they add nothing to a max and are not counted in an average."""
    if kernel == 1:
        return scores
    shape = scores.shape
    if valid is not None:
        scores = scores.masked_fill(~valid, 0.0 if pooling == "avg" else torch.finfo(scores.dtype).min)
    flat = scores.reshape(-1, 1, shape[-1])
    if pooling == "max":
        return F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2).reshape(shape)
    total = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    if valid is None:
        return total.reshape(shape)
    share = F.avg_pool1d(valid.to(scores.dtype).reshape(-1, 1, shape[-1]), kernel, stride=1, padding=kernel // 2)
    return (total / share.clamp_min(torch.finfo(scores.dtype).tiny)).reshape(shape)
