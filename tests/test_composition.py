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
from transformers import DynamicCache

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
    ("adakv", "adakv"): "use", ("adakv", "kvcompose"): "use", ("adakv", "kvzip"): "use", ("adakv", "lazyllm"): "use",
    ("adakv", "pagedeviction"): "use", ("adakv", "spatten"): "use",
    ("caote", "adakv"): "put", ("caote", "expectedattention"): "wrap", ("caote", "knorm"): "wrap",
    ("caote", "kvzip"): "wrap", ("caote", "lazyllm"): "use", ("caote", "pagedeviction"): "wrap",
    ("caote", "random"): "wrap", ("caote", "streamingllm"): "wrap",
    ("graphkv", "adakv"): "put", ("graphkv", "lazyllm"): "use", ("graphkv", "pagedeviction"): "use",
    ("pyramidkv", "adakv"): "put", ("pyramidkv", "kvcompose"): "use", ("pyramidkv", "kvzip"): "use",
    ("pyramidkv", "lazyllm"): "use",
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


def naive_caote_alpha(mass):
    """`alpha` of CAOTE from the unpooled per-KV-head mass `[B, Hkv, P]`: normalised over each head."""
    mass = mass.double().clamp(min=0)
    return mass / mass.sum(-1, keepdim=True)


@pytest.mark.parametrize("inner,rows", [(TOVA(budget=10), 1), (SnapKV(budget=10, window=3, kernel=5), 3),
                                        (H2O(budget=10, window=2), None)])
def test_caote_reads_per_head_unpooled_attention(inner, rows):
    """CAOTE's score of layer 0 at prefill, against an independent computation: the attention weights
    the model itself returns (eager, `output_attentions`, an ordinary DynamicCache), summed over the
    rows the inner policy asks for and over the query heads of each KV group (per KV head, unpooled),
    and the values of that DynamicCache."""
    from kvpress.policies import CAOTE

    model = tiny_model("llama", "eager")
    ids = random_ids(1, 30, seed=4)
    with torch.no_grad():
        reference = DynamicCache()
        weights = model(ids, cache=reference, output_attentions=True).attentions[0]  # [B, Hq, T, T]
    values = reference.layers[0].values.double()  # [B, Hkv, T, D]
    group = weights.shape[1] // values.shape[1]
    picked = weights if rows is None else weights[:, :, -rows:]
    mass = picked.double().sum(dim=2).unflatten(1, (values.shape[1], group)).sum(dim=2)  # [B, Hkv, T]
    alpha = naive_caote_alpha(mass)
    output = torch.einsum("bhp,bhpd->bhd", alpha, values)
    expected = alpha / (1 - alpha).clamp(min=1e-6) * (output[..., None, :] - values).norm(dim=-1)

    returned = {}
    original = CAOTE.score

    def spy(self, layer):
        score = original(self, layer)
        returned.setdefault(layer.layer_idx, score.clone())
        return score

    CAOTE.score = spy
    try:
        with torch.no_grad():
            model(ids, cache=PrunedCache(CAOTE(inner)))
    finally:
        CAOTE.score = original
    torch.testing.assert_close(returned[0].double(), expected, rtol=1e-3, atol=1e-6)


def test_refusals_are_raised_by_the_spec_parser_too():
    with pytest.raises(ValueError, match="adakv"):
        parse_spec("vatp(adakv(snapkv)):budget=8,window=2")
    with pytest.raises(ValueError, match="attention"):
        parse_spec("caote(knorm):budget=8,window=2")
    assert math.isfinite(parse_spec("adakv(vatp(snapkv)):budget=8,window=2").policy.floor)
