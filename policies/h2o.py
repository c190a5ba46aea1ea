"""H2O: heavy hitters by accumulated attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.policy import AttentionRequest, Policy


@dataclass
class H2O(Policy):
    """Heavy-Hitter Oracle: score each slot by the attention it has received from every query so far
    (prefill rows and every decoding step), summed over the query heads of its KV group; keep the
    recent `window` plus the top-scoring rest. Evicts at the end of prefill and at every decoding
    step, so the layer size stays at the budget.

    Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
    Models", arXiv 2306.14048. Score `S_j = sum_t A[t, j]`; a new slot starts with its own
    self-attention. `normalize=True` divides by the number of queries that could see the slot
    (NVIDIA kvpress's ObservedAttentionPress), an option, not the paper.
    Defaults: budget 0.2 (heavy 10% + recent 10% in the paper), window 32, no sinks.
    """

    spec_name = "h2o"

    budget: int | float = 0.2
    window: int = 32
    normalize: bool = False

    def request(self, phase: str) -> AttentionRequest:
        return AttentionRequest(rows=None, accumulate=True)

    def score(self, layer) -> torch.Tensor:
        if not self.normalize:
            return self.raw_scores(layer)
        observers = (layer.real_seen[:, None, None] - layer.positions).clamp(min=1)
        return self.raw_scores(layer) / observers
