"""Policy spec strings -> policy objects, tested with stand-in policy dataclasses."""

from __future__ import annotations

import types
from dataclasses import dataclass

import pytest

from kvpress.spec import CacheSpec, parse_spec, parse_value


@dataclass
class Scored:
    budget: int | float = 0.25
    window: int = 0
    kernel: int = 7
    pooling: str = "max"


@dataclass
class Plain:
    budget: int | float = 0.5
    normalize: bool = False


@dataclass
class ValueAware:  # a wrapper: has an `inner` field and declares `budget` too
    inner: object
    budget: float = 1.0
    alpha: float = 1.0


@dataclass
class Quant:
    bits: int = 8
    group: int = 32


REGISTRY = {"scored": Scored, "plain": Plain, "vatp": ValueAware}
OPTIONS = types.SimpleNamespace(KVQuant=Quant)


def parse(text):
    return parse_spec(text, registry=REGISTRY, options_module=OPTIONS)


def test_values_parse_as_int_float_bool_none_or_str():
    assert parse_value("1024") == 1024 and isinstance(parse_value("1024"), int)
    assert parse_value("0.5") == 0.5 and parse_value("1e-3") == 0.001
    assert parse_value("True") is True and parse_value("false") is False
    assert parse_value("none") is None and parse_value("avg") == "avg"


def test_simple_policy_with_parameters():
    spec = parse("scored:budget=1024,window=32,pooling=avg")
    assert spec.policy == Scored(budget=1024, window=32, pooling="avg")
    assert spec.name == "scored" and spec.budget == 1024 and spec.options == []


def test_names_are_case_insensitive_and_spaces_ignored():
    assert parse(" Scored : budget = 0.2 ").policy == Scored(budget=0.2)


@pytest.mark.parametrize("text", ["full", "FULL", "none"])
def test_full_means_no_policy(text):
    spec = parse(text)
    assert spec.policy is None and spec.name == "full" and spec.budget is None


def test_wrapper_routes_shared_fields_to_the_innermost_declaring_policy():
    spec = parse("vatp(plain):budget=0.25,alpha=2,normalize=true")
    assert spec.policy == ValueAware(inner=Plain(budget=0.25, normalize=True), alpha=2)
    assert spec.name == "vatp(plain)"


def test_nested_wrappers():
    spec = parse("vatp(vatp(scored)):window=8,alpha=0.5")
    assert spec.policy.inner.inner == Scored(window=8)
    assert spec.policy.inner.alpha == 0.5 and spec.policy.alpha == 1.0  # innermost declaring wrapper


def test_quantization_option_composes():
    spec = parse("scored:budget=0.5+kvquant:bits=4")
    assert spec.policy == Scored(budget=0.5) and spec.options == [Quant(bits=4)]
    assert "Quant(bits=4" in spec.canonical()
    assert parse("full+kvquant").options == [Quant()]


def test_missing_quantization_class_is_a_clear_error():
    with pytest.raises(ValueError, match="kvquant.*not available"):
        parse_spec("scored+kvquant:bits=4", registry=REGISTRY, options_module=types.SimpleNamespace())


def test_unknown_policy_lists_the_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown policy 'snap'.*plain, scored, vatp"):
        parse("snap:budget=1")


def test_unknown_parameter_lists_the_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown parameter 'windo'.*budget, kernel, pooling, window"):
        parse("scored:windo=3")
    with pytest.raises(ValueError, match=r"unknown parameter 'bitz'.*bits, group"):
        parse("scored+kvquant:bitz=3")


@pytest.mark.parametrize("text, message", [
    ("scored:budget", "key=value"),
    ("scored:budget=1,budget=2", "twice"),
    ("plain(scored)", "does not wrap"),
    ("vatp:alpha=1", "wraps another policy"),
    ("vatp(scored", "parentheses"),
    ("", "empty"),
    ("full:budget=3", "takes no parameters"),
])
def test_malformed_specs(text, message):
    with pytest.raises(ValueError, match=message):
        parse(text)


def test_canonical_form_ignores_parameter_order():
    assert parse("scored:window=3,budget=9").canonical() == parse("scored:budget=9,window=3").canonical()
    assert parse("full").canonical() == "full"


def test_every_registered_policy_parses():
    from kvpress.policies import REGISTRY

    assert REGISTRY
    for name, cls in REGISTRY.items():
        if any(f == "inner" for f in getattr(cls, "__dataclass_fields__", {})):
            continue
        if getattr(cls, "runs_decoder_layers", False):  # LazyLLM: a schedule instead of a budget
            spec = parse_spec(f"{name}:schedule=2:0.7/0.5:0.5")
            assert isinstance(spec.policy, cls) and spec.policy.schedule == ((2, 0.7), (0.5, 0.5))
            continue
        spec = parse_spec(f"{name}:budget=0.5")
        assert isinstance(spec.policy, cls) and spec.budget == 0.5
    assert isinstance(parse_spec("full"), CacheSpec)


def test_quantized_spec_builds_a_quantized_pruned_cache():
    import kvpress
    from kvpress.spec import build_cache

    spec = parse_spec("snapkv:budget=0.5+kvquant:bits=4")
    assert spec.options == [kvpress.KVQuant(bits=4)]
    cache = build_cache(spec)
    assert isinstance(cache, kvpress.PrunedCache)
    assert build_cache(spec) is not cache  # a fresh cache per sample
