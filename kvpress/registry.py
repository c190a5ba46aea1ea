"""The policy registry: spec name -> policy class.

A policy class that declares `spec_name` in its own body registers itself when its class statement
runs (`EvictionPolicy.__init_subclass__`); `kvpress.policies` imports every module of its folder, so
a new file there is registered, listed by `kvpress policies` and built from spec strings with no
other file edited.
"""

from __future__ import annotations

REGISTRY: dict[str, type] = {}


def register(cls: type) -> None:
    """Add `cls` under its `spec_name` (lowercase letters, digits and '_'); a name taken by another
    class is an error naming both."""
    name = cls.spec_name
    if not isinstance(name, str) or not name or name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"{cls.__qualname__}.spec_name must be a lowercase name of letters, digits and '_', "
                         f"got {name!r}")
    taken = REGISTRY.get(name)
    if taken is not None and taken.__qualname__ != cls.__qualname__:
        raise ValueError(f"spec name {name!r} of {cls.__module__}.{cls.__qualname__} is already taken by "
                         f"{taken.__module__}.{taken.__qualname__}")
    REGISTRY[name] = cls


def unregister(name: str) -> None:
    """Remove a registered name (a policy defined for a test, say)."""
    REGISTRY.pop(name, None)
