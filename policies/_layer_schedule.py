"""PyramidKV's linearly decreasing per-layer counts, shared with SpAtten's token schedule."""

from __future__ import annotations

import torch


def linear_layer_counts(mean: torch.Tensor, room: torch.Tensor, index: int, count: int,
                        ratio: float) -> torch.Tensor:
    """Slots of layer `index` out of `count` under a linearly decreasing schedule whose mean over
    layers is `mean` (PyramidKV's pyramid): `hi = 2*mean - lo`, `lo = mean / ratio`, and when `hi`
    exceeds `room` (slots a layer can hold), `hi = room`, `lo = 2*mean - hi`. Layer budgets are the
    integer differences of the cumulative real-valued schedule, so they sum to `count * mean` exactly.
    Exact integer arithmetic in fixed point (`2^-FRACTION_BITS` of a slot), so no float64 reaches the
    model's device. `mean`, `room`: long tensors of one shape; returns long, same shape."""
    if count == 1:
        return mean
    one = 1 << FRACTION_BITS
    mean, room = mean * one, room * one
    lo = mean * round(one / ratio) // one
    hi = 2 * mean - lo
    over = hi >= room
    hi = torch.where(over, room, hi)
    lo = 2 * mean - hi

    def cumulative(i: int) -> torch.Tensor:  # floor of the sum of the first i real-valued layer budgets
        # sum_{l < i} (hi - l * (hi - lo) / (count - 1)), over the common denominator (count - 1) * one
        numerator = i * hi * (count - 1) - (hi - lo) * (i * (i - 1) // 2)
        return torch.div(numerator, (count - 1) * one, rounding_mode="floor")

    return cumulative(index + 1) - cumulative(index)


FRACTION_BITS = 20
