"""A fuzzed contract: hypothesis draws a model family, a policy chain from the registry (a wrapper or
not), an int or float budget, slack, a batch with or without left padding, greedy / sampling / beam
decoding, quantized storage or not and chunked prefill or not, and checks what every user relies on:

- the budget bound: with an int budget `B`, every row holds at most `B + slack` slots per KV head on
  average over its layers and heads (per-layer and per-head policies move slots around, never add);
- a batch row equals the same row alone (greedy and beam decoding);
- `reset()` and reuse give what a fresh cache gives;
- the no-op cache equals `DynamicCache`;
- nothing raises but the library's documented refusals (`CompositionError` when a chain is built,
  LazyLLM's refusal of a chunk in which a row is all padding).

Found by this test and still open (docs/bad-input.md, "Known gaps"), so batch-equals-alone is checked
only without them: with a chunked prefill of a left-padded batch a row can differ from itself alone
(the chunks cut the row at other places, and a one-token last chunk runs as a decoding step); with
quantized storage a padded row's key groups (`group_size` consecutive slots) start at other tokens
than the row's alone, so its quantization error, and at times its tokens, differ.

CI runs the fixed examples of the "ci" profile (derandomized, so every run draws the same ones);
`HYPOTHESIS_PROFILE=long` draws 400 new ones locally."""

import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from registry_policies import generate
from tiny_models import FAMILY_IMPL, left_pad, random_ids, tiny_model
from transformers import DynamicCache

from kvpress import CompositionError, KVQuant, PrunedCache
from kvpress.policies import REGISTRY, SnapKV
from kvpress.policy import Wrapper

settings.register_profile("ci", max_examples=300, derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

WRAPPERS = sorted(name for name, cls in REGISTRY.items() if issubclass(cls, Wrapper))
LEAVES = sorted(name for name, cls in REGISTRY.items() if not issubclass(cls, Wrapper))
DECODING = {"greedy": {"do_sample": False}, "sampling": {"do_sample": True, "top_k": 20},
            "beam": {"do_sample": False, "num_beams": 2}}
MODELS = {}


def model_for(family: str, attn: str):
    if (family, attn) not in MODELS:
        MODELS[family, attn] = tiny_model(family, attn)
    return MODELS[family, attn]


def leaf(name: str, budget):
    cls = REGISTRY[name]
    if cls.runs_decoder_layers:  # LazyLLM: a schedule, no budget
        return cls(schedule=((1, 0.5),))
    fields = {"budget": budget}
    if "window" in cls.__dataclass_fields__:
        fields["window"] = 2
    if "sinks" in cls.__dataclass_fields__ and cls.__dataclass_fields__["sinks"].default:
        fields["sinks"] = 1
    return cls(**fields)


def chain(wrapper: str | None, inner: str, budget):
    policy = leaf(inner, budget)
    if wrapper is None:
        return policy
    if REGISTRY[wrapper].sets_storage:
        return REGISTRY[wrapper](policy, memory=4000, bits=4, per_layer=True, group_size=8)
    return REGISTRY[wrapper](policy)


@st.composite
def cases(draw):
    family, attn = draw(st.sampled_from(FAMILY_IMPL))
    wrapper = draw(st.one_of(st.none(), st.sampled_from(WRAPPERS)))
    inner = draw(st.sampled_from(LEAVES))
    budget = draw(st.one_of(st.integers(min_value=6, max_value=16), st.sampled_from([0.3, 0.5])))
    return {"family": family, "attn": attn, "wrapper": wrapper, "inner": inner, "budget": budget,
                "slack": draw(st.sampled_from([0, 3])), "padded": draw(st.booleans()),
                "decoding": draw(st.sampled_from(sorted(DECODING))),
                "quantized": draw(st.sampled_from([None, 4, 8])), "chunked": draw(st.booleans()),
                "seed": draw(st.integers(min_value=0, max_value=1000))}


def run(model, ids, mask, make_cache, case):
    settings_ = dict(max_new_tokens=6, pad_token_id=0, **DECODING[case["decoding"]])
    if case["chunked"]:
        settings_["prefill_chunk_size"] = 8
    cache = make_cache()
    torch.manual_seed(case["seed"])
    return generate(model, ids, cache, attention_mask=mask, **settings_), cache


def within_budget(cache, budget: int, slack: int) -> None:
    layers = cache.pruned_layers()
    held = sum(layer.valid.sum(dim=(-1, -2)) for layer in layers)  # [rows] over layers and heads
    allowed = len(layers) * layers[0].num_heads * (budget + slack)
    assert int(held.max()) <= allowed, (held.tolist(), allowed)


@settings.get_profile(PROFILE)
@given(case=cases())
def test_every_drawn_configuration_keeps_the_contract(case):
    try:
        policy = chain(case["wrapper"], case["inner"], case["budget"])
    except CompositionError:
        event("refused when built")
        return  # a documented refusal, raised when the chain is built
    quantization = None if case["quantized"] is None else KVQuant(bits=case["quantized"], group_size=8, residual=4)
    if policy.runs_decoder_layers and quantization is not None and case["family"] == "gemma2":
        quantization = None
    model = model_for(case["family"], case["attn"])
    rows = [random_ids(1, 26, seed=case["seed"])[0], random_ids(1, 17, seed=case["seed"] + 1)[0]]
    if case["padded"]:
        ids, mask = left_pad(rows)
    else:
        ids, mask = rows[0][None], None

    def make_cache():
        import copy

        return PrunedCache(copy.deepcopy(policy), slack=case["slack"], quantization=quantization)

    try:
        out, cache = run(model, ids, mask, make_cache, case)
    except NotImplementedError as refusal:  # documented: LazyLLM and a chunk of padding only
        assert "a row of this forward is all padding" in str(refusal), refusal
        assert policy.runs_decoder_layers and case["chunked"] and case["padded"]
        event("refused at the first forward")
        return
    if isinstance(case["budget"], int) and not policy.runs_decoder_layers and not any(
            member.sets_storage for member in policy.chain()):
        within_budget(cache, case["budget"], case["slack"])
        event("budget bound checked")

    cache.reset()  # reset and reuse equal a fresh cache
    torch.manual_seed(case["seed"])
    settings_ = dict(max_new_tokens=6, pad_token_id=0, **DECODING[case["decoding"]])
    if case["chunked"]:
        settings_["prefill_chunk_size"] = 8
    again = generate(model, ids, cache, attention_mask=mask, **settings_)
    assert torch.equal(again, out)

    # sampling draws differ with the batch size; chunked prefill of a padded batch: open, see above
    if case["padded"] and case["decoding"] != "sampling" and not case["chunked"] and quantization is None:
        for index, row in enumerate(rows):
            alone, _ = run(model, row[None], None, make_cache, case)
            width = ids.shape[1]
            assert torch.equal(out[index, width:], alone[0, row.shape[0]:]), f"row {index} differs from it alone"
        event("batch equals each row alone")

    if quantization is None and not case["chunked"]:  # the no-op cache equals DynamicCache
        torch.manual_seed(case["seed"])
        reference = model.generate(ids, attention_mask=mask, cache=DynamicCache(config=model.config),
                                   max_new_tokens=6, pad_token_id=0, **DECODING[case["decoding"]])
        torch.manual_seed(case["seed"])
        noop = model.generate(ids, attention_mask=mask, cache=PrunedCache(None), max_new_tokens=6, pad_token_id=0,
                              **DECODING[case["decoding"]])
        assert torch.equal(noop, reference)
        event("no-op equals DynamicCache")


def test_the_fuzzed_chains_reach_every_registered_policy():
    assert set(LEAVES) | set(WRAPPERS) == set(REGISTRY)
    assert all(chain(None, name, 8) is not None for name in LEAVES)
    assert isinstance(chain("adakv", "snapkv", 8).inner, SnapKV)


pytestmark = pytest.mark.filterwarnings("ignore")
