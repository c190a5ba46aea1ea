"""End to end on the real SmolLM2-135M-Instruct: the retrieval prompts of tests/retrieval.py (a fact
hidden in ~1.6k tokens of the Python language reference), first three cases.

Per configuration, measured with `OMP_NUM_THREADS=1 python benchmarks/retrieval_counts.py` (CPU,
fp32): RECORDED, how many greedy answers contain the fact, and RECORDED_NLL, the mean negative
log-likelihood per token of the fact teacher-forced after the prompt (the full cache's is the
floor). A configuration fails if it answers fewer cases or if its NLL rises by more than NLL_MARGIN
nats; answering more or a lower NLL is a finding to record, not a failure. The NLL makes the test
able to fail for configurations that answer none of the cases. Every configuration must also hold
its memory: the slots kept over all layers and heads never exceed the uniform budget's total
(per-layer and per-head schedules redistribute it, within one slot per head), and the bytes allocated
for keys and values stay within 1.1x those of the slots kept (padding per head, e.g. AdaKV's, counts);
the full cache keeps every token; LazyLLM, which bounds computation and not memory, holds fewer tokens
at its top layer than at its first.
"""

import math

import pytest
from retrieval import E2E_CASES, answer_and_nll, policy_configs

from kvpress import PrunedLayer, load_model
from kvpress.memory import kv_bytes
from kvpress.spec import build_cache, parse_spec

RECORDED = {  # answered out of 3
    "full": 3,
    "h2o@0.5": 0, "snapkv@0.5": 2, "tova@0.5": 0, "knorm@0.5": 1, "streamingllm@0.5": 0, "random@0.5": 0,
    "a2sf@0.5": 0, "vatp(h2o)@0.5": 0, "caote(h2o)@0.5": 0, "graphkv(snapkv)@0.5": 3,
    "pyramidkv(snapkv)@0.5": 2, "adakv(snapkv)@0.5": 3, "spatten@0.5": 0,
    "h2o@0.2": 0, "snapkv@0.2": 2, "tova@0.2": 0, "knorm@0.2": 0, "streamingllm@0.2": 0, "random@0.2": 0,
    "a2sf@0.2": 0, "vatp(h2o)@0.2": 0, "caote(h2o)@0.2": 0, "graphkv(snapkv)@0.2": 2,
    "pyramidkv(snapkv)@0.2": 2, "adakv(snapkv)@0.2": 2, "spatten@0.2": 0,
    "lazyllm": 1,
}
RECORDED_NLL = {  # mean NLL per token of the fact, teacher-forced (nats)
    "full": 2.927, "h2o@0.5": 6.132, "snapkv@0.5": 3.221, "tova@0.5": 4.482, "knorm@0.5": 5.560,
    "streamingllm@0.5": 6.215, "random@0.5": 5.266, "a2sf@0.5": 4.961, "vatp(h2o)@0.5": 6.127,
    "caote(h2o)@0.5": 6.022, "graphkv(snapkv)@0.5": 3.036, "pyramidkv(snapkv)@0.5": 3.396,
    "adakv(snapkv)@0.5": 3.104, "spatten@0.5": 8.128, "h2o@0.2": 6.101, "snapkv@0.2": 3.284,
    "tova@0.2": 5.955, "knorm@0.2": 7.480, "streamingllm@0.2": 6.271, "random@0.2": 8.656,
    "a2sf@0.2": 5.331, "vatp(h2o)@0.2": 6.138, "caote(h2o)@0.2": 6.178, "graphkv(snapkv)@0.2": 3.949,
    "pyramidkv(snapkv)@0.2": 3.281, "adakv(snapkv)@0.2": 3.279, "spatten@0.2": 8.396,
    "lazyllm": 4.159,
}
NLL_MARGIN = 0.25  # nats; two runs of the command agreed within 0.001
CONFIGS = policy_configs()


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


def test_every_configuration_has_recorded_values():
    assert set(RECORDED) == set(CONFIGS) == set(RECORDED_NLL)


@pytest.mark.real_model
@pytest.mark.parametrize("name", list(CONFIGS))
def test_retrieval_does_not_drop_below_the_recorded_answers_and_likelihood(smollm2, name):
    model, tokenizer = smollm2
    spec = parse_spec(CONFIGS[name])
    answered, nlls = [], []
    for case in E2E_CASES:
        cache = build_cache(spec)
        ok, nll = answer_and_nll(model, tokenizer, cache, case)
        answered.append(ok)
        nlls.append(nll)
        if cache.policy is None:
            assert slots_kept(cache) == sum(layer.num_heads * layer.seen for layer in pruned(cache))
        elif getattr(cache.policy, "runs_decoder_layers", False):  # LazyLLM: no budget; the top layer computed less
            assert cache.layers[-1].kept_slots < cache.layers[0].kept_slots == cache.layers[0].seen
        else:
            assert slots_kept(cache) <= allowed_slots(cache), f"{name} holds more than its budget"
            assert kv_bytes(cache) <= 1.1 * kv_bytes_kept(cache), f"{name} allocates more than 1.1x the slots kept"
    assert sum(answered) >= RECORDED[name], f"{name}: answered {answered}, recorded {RECORDED[name]}"
    nll = sum(nlls) / len(nlls)
    assert nll <= RECORDED_NLL[name] + NLL_MARGIN, f"{name}: answer NLL {nll:.3f}, recorded {RECORDED_NLL[name]}"


def pruned(cache) -> list[PrunedLayer]:
    return [layer for layer in cache.layers if isinstance(layer, PrunedLayer)]


def slots_kept(cache) -> int:
    return sum(int(layer.valid.sum()) for layer in pruned(cache))


def kv_bytes_kept(cache) -> int:
    """Bytes of the keys and values of the valid slots."""
    return sum(int(layer.valid.sum()) * 2 * layer.slots.head_dim * layer.slots.itemsize for layer in pruned(cache))


def allowed_slots(cache) -> int:
    layers = pruned(cache)
    budget = cache.policy.budget
    per_head = math.floor(layers[0].seen * budget)
    return sum(layer.num_heads * (per_head + 1) for layer in layers)
