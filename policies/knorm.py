"""Knorm: evict the keys with the largest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.policy import Policy


@dataclass
class Knorm(Policy):
    """Score = -||k_j||_2 per KV head: low-norm keys attract attention, so they are kept.

    Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
    arXiv 2406.11430. Attention-free. Models with q/k norms before RoPE (Qwen3, Gemma3) normalise
    the keys, so the norm carries little signal there.
    """

    spec_name = "knorm"

    budget: int | float = 0.5

    def score(self, layer) -> torch.Tensor:
        return -layer.keys.float().norm(dim=-1)
