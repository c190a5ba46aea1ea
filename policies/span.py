"""Span: smooth any policy's scores over neighbouring slots, so a kept token brings its span."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.policies.snapkv import pool_slots
from kvpress.policy import Wrapper


@dataclass
class Span(Wrapper):
    """Pool the inner policy's scores over the `kernel` neighbouring slots of each slot (stride 1, same
    length; "max" or "avg" over the valid slots of the window) before top-k, so that the pieces of a
    number or a name survive together: a passkey split into single-digit tokens is kept whole when one
    of its digits scores high, instead of losing the digits that score low.

    The smoothing is SnapKV's pooling (Li et al., "SnapKV: LLM Knows What You are Looking for Before
    Generation", arXiv 2404.14469: kernel 7, max pooling in its LongBench setting, the defaults here),
    offered for any scorer [our choice]: `span(h2o)`, `span(tova)`, `span(a2sf)`. Neighbours are
    neighbouring slots, which after an eviction are the nearest kept positions. Invalid slots (padding,
    evicted holes) never lend their score. No state of its own.
    """

    spec_name = "span"
    changes_scores = True
    couples_neighbouring_slots = True

    kernel: int = 7
    pooling: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"Span: kernel must be an odd int >= 1 (slots pooled), got {self.kernel!r}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"Span: pooling must be 'max' or 'avg', got {self.pooling!r}")

    def score(self, layer) -> torch.Tensor:
        return pool_slots(self.inner.score(layer).float(), self.kernel, self.pooling, layer.valid)
