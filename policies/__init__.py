"""Eviction policies, one module each, found by themselves: every module of this folder (names not
starting with '_') is imported, and each policy class that declares `spec_name` registers itself
(kvpress/registry.py). `REGISTRY` maps those names to classes (spec strings, `kvpress policies`);
the classes, and any other names a module lists in `__all__`, are exported here.

Adding a policy is adding one file: see docs/architecture.md ("Adding a policy")."""

import importlib
import pkgutil

from kvpress.registry import REGISTRY


def discover() -> list[str]:
    """Import every policy module of this package's path and export what registered. Returns the
    module names imported. Safe to call again (a module is imported once)."""
    found, exported = [], {"REGISTRY", "discover"}
    for module_info in pkgutil.iter_modules(__path__):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        found.append(module_info.name)
        for name in getattr(module, "__all__", ()):
            globals()[name] = getattr(module, name)
            exported.add(name)
    for cls in REGISTRY.values():
        globals()[cls.__name__] = cls
        exported.add(cls.__name__)
    globals()["__all__"] = sorted(exported)
    return found

discover()
