"""A2SF: accumulated attention with a forgetting factor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.budgets import check_number
from kvpress.policy import PREFILL, AttentionRequest, Policy


@dataclass
class A2SF(Policy):
    """Accumulative Attention Score with Forgetting Factor: H2O's accumulated attention, but every
    step first multiplies the running score by `forgetting`, so a slot is judged by recent attention
    more than by old attention and early tokens lose H2O's head start.

    Jo and Shin, "A2SF: Accumulative Attention Scoring with Forgetting Factor for Token Pruning in
    Transformer Decoder", arXiv 2407.20485. Score, per KV head (summed over its query heads as in the
    reference code): `S_t(j) = forgetting * S_{t-1}(j) + A[t, j]`, i.e. after `n` rows
    `S_n(j) = sum_{q >= j} forgetting^(n-q) A[q, j]`; the prefill adds its rows with weights
    `forgetting^(age)`, every decoding step decays and adds the new row. `forgetting = 1` is H2O.
    State: the decayed score, gathered with the slots at every compaction.
    Defaults (the reference README's LongBench example): forgetting 0.95, recent window 16,
    budget 256 slots per KV head. `prefill_only=True` is the reference repository's one-shot mode
    (compress the prompt, never evict while decoding); the default also evicts one slot per decoding
    step outside the window, like H2O [our choice, docs/policies.md].
    """

    spec_name = "a2sf"

    budget: int | float = 256
    window: int = 16
    forgetting: float = 0.95
    prefill_only: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("A2SF", "forgetting", self.forgetting, 0, 1, open_low=True)

    def request(self, phase: str) -> AttentionRequest:
        return AttentionRequest(rows=None, decay=float(self.forgetting), accumulate=True)

    def evicts_during(self, phase: str) -> bool:
        return phase == PREFILL or not self.prefill_only

    def score(self, layer) -> torch.Tensor:
        return self.raw_scores(layer)
