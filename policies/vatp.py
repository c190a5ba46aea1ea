"""VATP: value-aware token pruning."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.budgets import check_int
from kvpress.policies._nonnegative_scores import shift_nonnegative
from kvpress.policy import Wrapper


@dataclass
class VATP(Wrapper):
    """Multiply the inner policy's score of each slot by the L1 norm of its value vector: a slot the
    queries attend to but whose value is tiny barely changes the attention output.

    Guo et al., "Attention Score is not All You Need for Token Importance Indicator in KV Cache
    Reduction: Value Also Matters", arXiv 2406.12335. Score `I_j = s_j * ||v_j||_1`, with `s_j` the
    inner score of the KV head (already reduced over its query heads) and `v_j` the cached value of
    that head (fp32). Under H2O this is `||v_j||_1 * sum_t A[t, j]`, the paper's main setting.
    Attention sinks have small value norms and would be evicted, so the first `sink_tokens` real
    tokens are always kept (the reference's `sink_len = 20`), inside the budget.
    Inner scores that can be negative (Knorm's `-||k||`) are shifted to >= 0 per head first
    [our choice]. State: the inner policy's; value norms are recomputed from the cache when it selects.
    """

    spec_name = "vatp"
    changes_scores = True

    sink_tokens: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("VATP", "sink_tokens", self.sink_tokens, 0)

    def score(self, layer) -> torch.Tensor:
        inner = shift_nonnegative(self.inner.score(layer).float(), layer.valid)  # [B, Hkv, P]
        return inner * layer.values.float().abs().sum(dim=-1)

    def protected_bound(self, layer) -> int:
        return min(layer.seen, self.inner.protected_bound(layer) + self.sink_tokens)

    def protected(self, layer) -> torch.Tensor:
        sinks = layer.valid & (layer.positions >= 0) & (layer.positions < self.sink_tokens)
        return self.inner.protected(layer) | sinks
