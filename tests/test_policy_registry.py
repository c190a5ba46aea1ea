"""A policy is one file: a module dropped into the policies package registers itself, is listed by
`kvpress policies` and builds from a spec string, with no other file edited."""

import textwrap

import pytest
import torch
from tiny_models import random_ids, tiny_model

from kvpress import PrunedCache, policies
from kvpress.cli import describe_policies
from kvpress.registry import REGISTRY, unregister
from kvpress.spec import build_cache, parse_spec

NEWEST_FIRST = '''
"""Keeps the newest tokens: a policy written for the registry test (no paper)."""

from dataclasses import dataclass

import torch

from kvpress.policy import Policy


@dataclass
class NewestFirst(Policy):
    """Scores each slot by its position: the newest tokens are kept."""

    spec_name = "newestfirst"

    budget: int | float = 8

    def score(self, layer) -> torch.Tensor:
        return layer.positions.float()
'''


@pytest.fixture
def dropped_policy(tmp_path, monkeypatch):
    (tmp_path / "newest_first.py").write_text(textwrap.dedent(NEWEST_FIRST))
    monkeypatch.setattr(policies, "__path__", [*policies.__path__, str(tmp_path)])
    yield policies.discover()
    unregister("newestfirst")
    policies.__dict__.pop("NewestFirst", None)


def test_a_policy_file_dropped_into_the_package_registers_itself(dropped_policy):
    assert "newest_first" in dropped_policy
    cls = REGISTRY["newestfirst"]
    assert cls.__name__ == "NewestFirst" and policies.NewestFirst is cls
    assert "newestfirst  [NewestFirst]  Scores each slot by its position" in describe_policies()
    spec = parse_spec("newestfirst:budget=6")
    assert spec.policy == cls(budget=6)
    model = tiny_model("llama", "sdpa")
    cache = build_cache(spec)
    with torch.no_grad():
        model(random_ids(1, 20), cache=cache)
    for layer in cache.layers:  # the 6 newest of 20 tokens
        assert sorted(layer.positions[0, 0][layer.valid[0, 0]].tolist()) == list(range(14, 20))
    wrapped = parse_spec("pyramidkv(newestfirst):budget=6").policy
    assert isinstance(wrapped.inner, cls)


def test_spec_names_are_unique_and_lowercase():
    from kvpress.policy import Policy

    with pytest.raises(ValueError, match="spec name 'h2o' of .*Clash is already taken by kvpress.policies.h2o.H2O"):
        type("Clash", (Policy,), {"spec_name": "h2o", "__module__": __name__})
    with pytest.raises(ValueError, match="spec_name must be a lowercase name"):
        type("Shouty", (Policy,), {"spec_name": "Shouty", "__module__": __name__})
    assert "shouty" not in REGISTRY and REGISTRY["h2o"].__name__ == "H2O"


def test_every_registered_policy_builds_a_cache_from_its_spec_name():
    for name, cls in REGISTRY.items():
        assert cls.spec_name == name
        assert getattr(policies, cls.__name__) is cls
    assert PrunedCache(parse_spec("h2o:budget=8,window=2").policy).policy.spec_name == "h2o"
