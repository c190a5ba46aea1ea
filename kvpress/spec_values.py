"""One value of a spec string: the parsing the spec parser and policies that read strings (LazyLLM's
schedule) share."""

from __future__ import annotations

from typing import Any


def parse_value(text: str) -> Any:
    """``"1024"`` -> 1024, ``"0.5"`` -> 0.5, ``"true"`` -> True, ``"none"`` -> None, else the string."""
    text = text.strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
