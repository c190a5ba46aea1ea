"""TOVA: keep the tokens the newest query attends to most, averaged over all heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.policy import AttentionRequest, Policy


@dataclass
class TOVA(Policy):
    """Token Omission Via Attention: at the end of prefill and at every decoding step, score each
    slot by the last query's attention averaged over *all* query heads, and keep the top `budget`;
    every KV head keeps the same tokens.

    Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104. Nothing is protected by
    default (sinks = window = 0), as in the paper.
    """

    spec_name = "tova"

    budget: int | float = 0.25

    def request(self, phase: str) -> AttentionRequest:
        return AttentionRequest(rows=1, accumulate=False)

    def score(self, layer) -> torch.Tensor:
        # last-row mass summed over the query heads of each KV head -> sum over all heads
        mass = self.raw_scores(layer)
        return mass.sum(dim=1, keepdim=True).expand_as(mass)
