"""Scores made non-negative before a wrapper uses them multiplicatively (VATP, GraphKV)."""

from __future__ import annotations

import torch


def shift_nonnegative(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Shift each (row, head) of `scores [B, H, P]` up by its most negative score over `mask`, so
    scores that are used multiplicatively (value norms, decay, normalisation) keep their order.
    Heads whose masked scores are already >= 0 are returned unchanged."""
    lowest = torch.where(mask, scores, torch.zeros_like(scores)).amin(dim=-1, keepdim=True)  # [B, H, 1]
    return scores - lowest.clamp(max=0.0)
