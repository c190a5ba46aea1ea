"""Every (wrapper, inner) pair of the registry either runs end to end or is refused when built, and by
the spec parser, with a message that names the order that works. Which pairs are refused is pinned by
an explicit list below, so a rule of kvpress/composition.py that starts refusing (or accepting) a pair
fails this test; a new policy's pairs show up as unlisted and must be decided here."""

import itertools
import math

import pytest
import torch
from registry_policies import generate, make_policy
from tiny_models import left_pad, random_ids, tiny_model

from kvpress import CompositionError, PrunedCache
from kvpress.policies import (
    H2O,
    REGISTRY,
    TOVA,
    AdaKV,
    PagedEviction,
    PyramidKV,
    QuantizedPruning,
    SnapKV,
    Span,
)
from kvpress.policy import Wrapper
from kvpress.spec import parse_spec

WRAPPERS = sorted(name for name, cls in REGISTRY.items() if issubclass(cls, Wrapper))
PAIRS = list(itertools.product(WRAPPERS, sorted(REGISTRY)))

# (wrapper, inner) -> a word of the order that works: "put" (swap them), "use" (the inner alone),
# "wrap" (an attention-scoring inner). Every pair not listed runs.
REFUSED = {
    ("adakv", "adakv"): "use", ("adakv", "kvcompose"): "use", ("adakv", "lazyllm"): "use",
    ("adakv", "pagedeviction"): "use", ("adakv", "spatten"): "use",
    ("caote", "adakv"): "put", ("caote", "expectedattention"): "wrap", ("caote", "knorm"): "wrap",
    ("caote", "kvzip"): "wrap", ("caote", "lazyllm"): "use", ("caote", "pagedeviction"): "wrap",
    ("caote", "random"): "wrap", ("caote", "streamingllm"): "wrap",
    ("graphkv", "adakv"): "put", ("graphkv", "lazyllm"): "use", ("graphkv", "pagedeviction"): "use",
    ("pyramidkv", "adakv"): "put", ("pyramidkv", "kvcompose"): "use", ("pyramidkv", "lazyllm"): "use",
    ("pyramidkv", "pagedeviction"): "use", ("pyramidkv", "pyramidkv"): "use", ("pyramidkv", "spatten"): "use",
    ("quantizedpruning", "lazyllm"): "use", ("quantizedpruning", "quantizedpruning"): "use",
    ("span", "adakv"): "put", ("span", "kvcompose"): "use", ("span", "kvzip"): "use", ("span", "lazyllm"): "use",
    ("span", "pagedeviction"): "use",
    ("vatp", "adakv"): "put", ("vatp", "lazyllm"): "use", ("vatp", "pagedeviction"): "use",
}


def build(wrapper: str, inner: str):
    if wrapper == "quantizedpruning":
        return QuantizedPruning(make_policy(inner, 10), memory=2500, bits=4, per_layer=True, group_size=8)
    return REGISTRY[wrapper](make_policy(inner, 10))


def spec_text(wrapper: str, inner: str) -> str:
    inner_text = f"{inner}(snapkv)" if issubclass(REGISTRY[inner], Wrapper) else inner
    # LazyLLM has a schedule, not a budget
    budgeted = not getattr(REGISTRY[inner], "runs_decoder_layers", False)
    params = ("budget=10,window=2" if budgeted else "schedule=1:0.5") + (",memory=2500,bits=4,group_size=8,per_layer=true" if "quantizedpruning" in
                            (wrapper, inner) else "")
    return f"{wrapper}({inner_text}):{params}"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", "eager")


@pytest.mark.parametrize("wrapper,inner", PAIRS)
def test_every_pair_runs_or_is_refused_with_the_order_that_works(model, wrapper, inner):
    if (wrapper, inner) in REFUSED:
        with pytest.raises(CompositionError) as refusal:
            build(wrapper, inner)
        word = REFUSED[wrapper, inner]
        message = str(refusal.value)
        assert word in message, message
        if word == "put":
            assert f"{inner}({wrapper}(...))" in message, message
        elif word == "use":
            assert f"use {inner} alone" in message or f"use one {inner}(...)" in message, message
        with pytest.raises(CompositionError) as parsed:
            parse_spec(spec_text(wrapper, inner))
        assert str(parsed.value) == message
        return
    policy = build(wrapper, inner)
    ids, mask = left_pad([random_ids(1, 30, seed=1)[0], random_ids(1, 24, seed=2)[0]])
    cache = PrunedCache(policy)
    out = generate(model, ids, cache, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 35)
    for layer in cache.layers:  # every row evicted
        assert bool((layer.valid.sum(-1) < layer.real_seen[:, None]).all())
    assert parse_spec(spec_text(wrapper, inner)).policy is not None


def test_the_refused_list_names_registered_pairs_only():
    assert set(REFUSED) <= set(PAIRS), sorted(set(REFUSED) - set(PAIRS))


def test_span_around_whole_blocks_is_refused_naming_why():
    with pytest.raises(CompositionError, match=r"Span\(PagedEviction\(...\)\): .*whole blocks.*split its blocks"):
        Span(PagedEviction(budget=16, block_size=4))
    with pytest.raises(CompositionError, match="whole blocks"):
        parse_spec("span(pagedeviction):budget=16")


def test_quantized_pruning_keeps_the_inner_per_layer_and_per_head_counts():
    model = tiny_model("llama", "eager", num_hidden_layers=4)
    ids = random_ids(1, 60, seed=3)
    memory = 6000

    def run(policy):
        cache = PrunedCache(policy)
        with torch.no_grad():
            model(ids, cache=cache)
        return [layer.valid.sum(-1)[0].tolist() for layer in cache.layers], cache
    pyramid = PyramidKV(SnapKV(budget=16, window=2, kernel=3), beta=4)
    alone, _ = run(pyramid)
    for outer in (QuantizedPruning(pyramid, memory=memory, bits=4, per_layer=True, group_size=8),
                  PyramidKV(QuantizedPruning(SnapKV(budget=16, window=2, kernel=3), memory=memory, bits=4,
                                             per_layer=True, group_size=8), beta=4)):
        counts, cache = run(outer)
        per_layer = [c[0] for c in counts]
        assert per_layer == sorted(per_layer, reverse=True) and per_layer[0] > per_layer[-1], per_layer
        slots = cache.layers[0].budget
        assert abs(sum(per_layer) - 4 * slots) <= 1  # the pyramid around what the memory holds at 4 bits
        assert slots > 16 and sum(per_layer) > sum(c[0] for c in alone)
        assert all(layer.store is not None and layer.store.quant.bits == 4 for layer in cache.layers)
    ada, _ = run(QuantizedPruning(AdaKV(SnapKV(budget=16, window=2, kernel=3)), memory=memory, bits=4,
                                  per_layer=True, group_size=8))
    assert any(len(set(heads)) > 1 for heads in ada)  # AdaKV's per-head counts survive


def naive_caote_alpha(mass, valid):
    """`alpha` of CAOTE from the unpooled per-KV-head mass: normalised over each head's valid slots."""
    mass = mass.double().clamp(min=0) * valid
    return mass / mass.sum(-1, keepdim=True)


@pytest.mark.parametrize("inner", [TOVA(budget=10), SnapKV(budget=10, window=3, kernel=5), H2O(budget=10, window=2)])
def test_caote_reads_per_head_unpooled_attention(inner):
    from kvpress.policies import CAOTE

    model = tiny_model("llama", "eager")
    cache = PrunedCache(CAOTE(inner))
    captured = {}
    original = CAOTE.score

    def spy(self, layer):
        captured.setdefault(layer.layer_idx, (layer.scores.clone(), layer.valid.clone(), layer.values.clone()))
        return original(self, layer)

    CAOTE.score = spy
    try:
        with torch.no_grad():
            model(random_ids(1, 30, seed=4), cache=cache)
    finally:
        CAOTE.score = original
    mass, valid, values = captured[0]
    alpha = naive_caote_alpha(mass, valid)
    output = torch.einsum("bhp,bhpd->bhd", alpha, values.double())
    expected = alpha / (1 - alpha).clamp(min=1e-6) * (output[..., None, :] - values.double()).norm(dim=-1)
    ours = CAOTE(inner).score(_Frozen(mass, valid, values))
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-6)
    if not isinstance(inner, H2O):  # TOVA sums over heads, SnapKV pools: their final scores are not alpha
        pooled = inner.score(_Frozen(mass, valid, values)).double()
        assert not torch.allclose(pooled / pooled.sum(-1, keepdim=True), alpha)


class _Frozen:
    """A layer as CAOTE and its inner policy read it, from captured tensors."""

    def __init__(self, mass, valid, values):
        self.scores, self.valid, self.values = mass, valid, values

    def state(self, policy):
        return self


def test_refusals_are_raised_by_the_spec_parser_too():
    with pytest.raises(ValueError, match="adakv"):
        parse_spec("vatp(adakv(snapkv)):budget=8,window=2")
    with pytest.raises(ValueError, match="attention"):
        parse_spec("caote(knorm):budget=8,window=2")
    assert math.isfinite(parse_spec("adakv(vatp(snapkv)):budget=8,window=2").policy.floor)
