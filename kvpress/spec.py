"""Policy spec strings: a one-line description of a cache configuration, parsed into policy objects.

Grammar::

    spec    := "full" | chain [":" params] ("+" option)*
    chain   := name | name "(" chain ")"          # a wrapper around an inner policy
    params  := key "=" value ("," key "=" value)*
    option  := name [":" params]                  # e.g. quantization: "kvquant:bits=4"

Examples: ``"snapkv:budget=1024,window=32"``, ``"vatp(h2o):budget=0.25"``,
``"snapkv:budget=0.5+kvquant:bits=4"``, ``"full"`` (no eviction).

Policy names come from ``kvpress.policies.REGISTRY`` (lowercase name -> ``@dataclass`` class; a
wrapper has a field ``inner``). A keyword goes to the policy of the chain that declares a dataclass
field of that name, the innermost one when several do (so ``budget`` reaches the scored policy).
Options after ``+`` name a class exported by ``kvpress`` (case-insensitive), resolved when parsed.
Values parse as int, float, bool (true/false), none, else str. Unknown names and parameters raise
``ValueError`` naming them and listing the accepted ones.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvpress.spec_values import parse_value

FULL_NAMES = ("full", "none", "dense")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def parse_params(text: str, where: str) -> dict[str, Any]:
    """``"a=1,b=x"`` -> ``{"a": 1, "b": "x"}``; ``where`` names the spec part in errors."""
    params: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise ValueError(f"bad parameter {item!r} in {where!r}: write key=value")
        if key in params:
            raise ValueError(f"parameter {key!r} given twice in {where!r}")
        params[key] = parse_value(value)
    return params


def parse_chain(text: str) -> list[str]:
    """``"vatp(h2o)"`` -> ``["vatp", "h2o"]`` (outermost first)."""
    names, rest = [], text.strip()
    while "(" in rest:
        if not rest.endswith(")"):
            raise ValueError(f"unbalanced parentheses in policy {text!r}")
        outer, _, rest = rest.partition("(")
        names.append(outer.strip())
        rest = rest[:-1].strip()
    names.append(rest)
    for name in names:
        if not _NAME.match(name):
            raise ValueError(f"bad policy name {name!r} in {text!r}")
    return [n.lower() for n in names]


def _fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and f.name != "inner"] if dataclasses.is_dataclass(cls) else []


def _is_wrapper(cls) -> bool:
    return dataclasses.is_dataclass(cls) and any(f.name == "inner" for f in dataclasses.fields(cls))


def _lookup(name: str, registry: Mapping[str, type]) -> type:
    if name not in registry:
        raise ValueError(f"unknown policy {name!r}; accepted: {', '.join(sorted(registry))} "
                         f"or {FULL_NAMES[0]!r} for no eviction")
    return registry[name]


def build_chain(names: list[str], params: dict[str, Any], registry: Mapping[str, type]):
    """Instantiate ``names`` (outermost first), routing each keyword to the innermost declaring class."""
    classes = [_lookup(n, registry) for n in names]
    for outer, name in zip(classes[:-1], names[:-1]):
        if not _is_wrapper(outer):
            raise ValueError(f"policy {name!r} does not wrap another policy (it has no 'inner' field)")
    if _is_wrapper(classes[-1]):
        raise ValueError(f"policy {names[-1]!r} wraps another policy: write {names[-1]}(snapkv) or similar")
    per_class: list[dict[str, Any]] = [{} for _ in classes]
    for key, value in params.items():
        owners = [i for i, cls in enumerate(classes) if any(f.name == key for f in _fields(cls))]
        if not owners:
            accepted = sorted({f.name for cls in classes for f in _fields(cls)})
            raise ValueError(f"unknown parameter {key!r} for policy {'('.join(names)}{')' * (len(names) - 1)}; "
                             f"accepted: {', '.join(accepted) or 'none'}")
        per_class[max(owners)][key] = value
    policy = None
    for cls, kwargs, name in reversed(list(zip(classes, per_class, names))):
        try:
            policy = cls(**kwargs) if policy is None else cls(inner=policy, **kwargs)
        except TypeError as err:
            raise ValueError(f"cannot build policy {name!r} with {kwargs}: {err}") from None
    return policy


def resolve_option(name: str, module=None) -> type:
    """A class exported by ``kvpress`` whose name matches ``name`` case-insensitively."""
    if module is None:
        import kvpress as module
    exported = {n.lower(): getattr(module, n) for n in dir(module) if not n.startswith("_")}
    target = exported.get(name.lower())
    if not isinstance(target, type):
        raise ValueError(  # noqa: TRY004 -- a missing feature, not a bad type
            f"option {name!r} is not available: kvpress exports no class {name!r} "
            "(quantization needs kvpress.KVQuant; is this version too old?)"
        )
    return target


@dataclass
class CacheSpec:
    """A parsed spec: the eviction policy (None: keep everything) and extra cache options."""

    text: str
    policy: Any = None
    options: list[Any] = field(default_factory=list)
    chain: list[str] = field(default_factory=list)  # registry names, outermost first

    @property
    def name(self) -> str:
        """Policy chain name: ``"full"``, ``"snapkv"``, ``"vatp(h2o)"``."""
        return "(".join(self.chain) + ")" * (len(self.chain) - 1) if self.chain else "full"

    @property
    def budget(self) -> Any:
        """The budget the cache enforces (the innermost policy's), None for the full cache."""
        return getattr(self.policy, "budget", None) if self.policy is not None else None

    def canonical(self) -> str:
        """A string equal for equal configurations (dataclass reprs), used to compare runs."""
        parts = [repr(self.policy) if self.policy is not None else "full"] + [repr(o) for o in self.options]
        return " + ".join(parts)


def parse_spec(text: str, registry: Mapping[str, type] | None = None, options_module=None) -> CacheSpec:
    """Parse a spec string; ``registry`` defaults to ``kvpress.policies.REGISTRY``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty policy spec; give e.g. 'snapkv:budget=0.5' or 'full'")
    head, *option_texts = [part.strip() for part in text.split("+")]
    spec = CacheSpec(text.strip())
    chain_text, _, param_text = head.partition(":")
    if chain_text.strip().lower() in FULL_NAMES:
        if param_text.strip():
            raise ValueError(f"{chain_text.strip()!r} takes no parameters (got {param_text!r})")
    else:
        if registry is None:
            from kvpress.policies import REGISTRY as registry
        spec.chain = parse_chain(chain_text)
        spec.policy = build_chain(spec.chain, parse_params(param_text, head), registry)
    for option_text in option_texts:
        name, _, params_text = option_text.partition(":")
        cls = resolve_option(name.strip(), options_module)
        params = parse_params(params_text, option_text)
        known = {f.name for f in _fields(cls)}
        unknown = [k for k in params if dataclasses.is_dataclass(cls) and k not in known]
        if unknown:
            raise ValueError(f"unknown parameter {unknown[0]!r} for option {name.strip()!r}; "
                             f"accepted: {', '.join(sorted(known)) or 'none'}")
        try:
            spec.options.append(cls(**params))
        except (TypeError, ValueError) as err:
            raise ValueError(f"cannot build option {name.strip()!r} with {params}: {err}") from None
    return spec


def build_cache(spec: CacheSpec, config=None, after_prompt: str = "evict"):
    """A fresh cache for one generation: ``PrunedCache(policy, config=..., quantization=...,
    after_prompt=...)``, with its own copy of the policy and option (policies may keep state per cache)."""
    import copy

    from kvpress import PrunedCache

    if len(spec.options) > 1:
        raise ValueError(f"{spec.text!r}: at most one option (the quantization), got {len(spec.options)}")
    quantization = copy.deepcopy(spec.options[0]) if spec.options else None
    return PrunedCache(copy.deepcopy(spec.policy), config=config, quantization=quantization,
                       after_prompt=after_prompt)
