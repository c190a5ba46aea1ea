"""Budget arithmetic and argument checks: how many slots a budget keeps, and the validation every
policy's and the cache's parameters share (a `ValueError` naming the owner, the argument, the value
and the accepted range)."""

from __future__ import annotations

from fractions import Fraction

import torch


def check_int(owner: str, name: str, value, low: int = 0, meaning: str = "") -> None:
    """`value` must be an int (not a bool) >= `low`; `meaning` is said in the error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        said = f" ({meaning})" if meaning else ""
        raise ValueError(f"{owner}: {name} must be an int >= {low}{said}, got {value!r}")


def check_bool(owner: str, name: str, value) -> None:
    """`value` must be True or False."""
    if type(value) is not bool:
        raise ValueError(f"{owner}: {name} must be a bool (True or False), got {value!r}")


def check_number(owner: str, name: str, value, low: float, high: float | None = None, *,
                 open_low: bool = False, meaning: str = "") -> None:
    """`value` must be an int or float (not a bool) in `[low, high]` (`(low, high]` with `open_low`; no
    upper end when `high` is None); `meaning` is said in the error."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    inside = number and (low < value if open_low else low <= value) and (high is None or value <= high)
    if not inside:
        if high is None:
            interval = f"{'>' if open_low else '>='} {low}"
        else:
            interval = f"in {'(' if open_low else '['}{low}, {high}]"
        said = f" ({meaning})" if meaning else ""
        raise ValueError(f"{owner}: {name} must be a number {interval}{said}, got {value!r}")


def check_budget(owner: str, budget, sinks: int = 0, window: int = 0) -> None:
    """Validate a budget and its protected slots; raise `ValueError` naming the argument."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"{owner}: budget must be an int >= 1 (slots per KV head) or a float in (0, 1] "
                         f"(fraction of tokens seen), got {budget!r}")
    if isinstance(budget, float) and not (0.0 < budget <= 1.0):
        raise ValueError(f"{owner}: a float budget is a fraction of the tokens seen and must lie in (0, 1], "
                         f"got {budget}")
    if isinstance(budget, int) and budget <= 0:
        raise ValueError(f"{owner}: budget must be >= 1 slot per KV head, got {budget}")
    for name, value in (("sinks", sinks), ("window", window)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{owner}: {name} must be an int >= 0, got {value!r}")
    if isinstance(budget, int) and sinks + window >= budget:
        raise ValueError(f"{owner}: sinks + window ({sinks} + {window}) must be smaller than budget ({budget}), "
                         f"otherwise nothing is left to choose")


def budget_fraction(budget: float) -> Fraction:
    return Fraction(budget).limit_denominator(1_000_000)


def host_slots_for_budget(budget, seen: int) -> int:
    """`slots_for_budget` for a host-side token count: an upper bound of every row's count when `seen`
    counts padding too."""
    if isinstance(budget, float):
        fraction = budget_fraction(budget)
        return min(seen, max(1, seen * fraction.numerator // fraction.denominator))
    return min(seen, budget)


def slots_for_budget(budget, real_seen: torch.Tensor) -> torch.Tensor:
    """Slots each row may keep: `[B]` long. Int budget: that many (at most the real tokens seen);
    float budget: `max(1, floor(seen * budget))` of the row's real tokens, in integer arithmetic
    (the budget as the nearest fraction with a denominator up to 10^6), so no float64 reaches the
    model's device."""
    if not isinstance(budget, float):
        return real_seen.clamp(max=budget)
    fraction = budget_fraction(budget)
    scaled = real_seen * fraction.numerator if fraction.numerator != 1 else real_seen
    return torch.minimum(torch.clamp(scaled // fraction.denominator, min=1), real_seen)
