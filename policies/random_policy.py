"""Random eviction: the control every scoring policy must beat."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvpress.policy import Policy


@dataclass
class RandomPolicy(Policy):
    """Keep a uniformly random subset of the slots (plus sinks and window), reproducibly.

    A baseline, not a paper: scores are drawn from a `torch.Generator` seeded with `seed`, so two
    runs with the same seed and inputs evict the same slots. With `budget=1.0` it never evicts,
    which makes it the no-op policy of the test suite.
    """

    budget: int | float = 0.25
    seed: int = 0
    _generator: torch.Generator | None = field(default=None, init=False, repr=False, compare=False)

    def score(self, layer) -> torch.Tensor:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        draw = torch.rand(layer.valid.shape, generator=self._generator)
        return draw.to(layer.valid.device)
