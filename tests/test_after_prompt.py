"""`PrunedCache(policy, after_prompt=...)`: "evict" keeps evicting while decoding; "append" compresses the
prompt once and appends every later token. Checked against an independent reference: transformers'
`DynamicCache` loaded with the slots the prompt's compression kept, fed the same later tokens at the
same positions, gives the same logits (so nothing is evicted or reweighted after the prompt)."""

import pytest
import torch
from tiny_models import random_ids, tiny_model
from transformers import DynamicCache

from kvpress import KVQuant, PrunedCache
from kvpress.policies import H2O, AdaKV, KVCompose, LazyLLM, SnapKV

DOCUMENT, BUDGET = 60, 16
QUESTIONS = [random_ids(1, 8, seed=40 + i) for i in range(3)]
STEPS = 4


def kept_positions(cache) -> list[list[set[int]]]:
    return [[set(layer.positions[0, h][layer.valid[0, h]].tolist()) for h in range(layer.num_heads)]
            for layer in cache.pruned_layers()]


def turns(model, cache, seen: int, logits_of=None):
    """Three questions, each a multi-token forward then `STEPS` greedy one-token steps, at explicit
    positions; returns the logits of every forward."""
    out = []
    for question in QUESTIONS:
        for ids in [question] + [None] * STEPS:
            if ids is None:
                ids = out[-1][:, -1:].argmax(-1)
            positions = torch.arange(seen, seen + ids.shape[1])[None]
            out.append(model(ids, position_ids=positions, cache=cache, use_cache=True).logits)
            seen += ids.shape[1]
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", "eager")


@pytest.mark.parametrize("policy", [SnapKV(budget=BUDGET, window=4), H2O(budget=BUDGET, window=4)],
                         ids=["snapkv", "h2o"])
def test_append_keeps_the_compressed_prompt_and_attends_like_dynamic_cache_over_it(model, policy):
    document = random_ids(1, DOCUMENT, seed=7)
    cache = PrunedCache(policy, after_prompt="append")
    with torch.no_grad():
        cache.prefill(model, document)
        compressed = kept_positions(cache)
        reference = DynamicCache()
        for index, layer in enumerate(cache.pruned_layers()):
            valid = layer.valid[0]  # [Hkv, P]: every head keeps BUDGET slots
            keys = torch.stack([layer.keys[0, h][valid[h]] for h in range(layer.num_heads)])[None]
            values = torch.stack([layer.values[0, h][valid[h]] for h in range(layer.num_heads)])[None]
            reference.update(keys, values, index)
        ours = turns(model, cache, DOCUMENT)
        expected = turns(model, reference, DOCUMENT)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    later = 3 * (8 + STEPS)
    for layer_before, layer_after in zip(compressed, kept_positions(cache)):
        for before, after in zip(layer_before, layer_after):
            assert len(before) == BUDGET
            assert before <= after, "the compressed prompt lost tokens after it was compressed"
            assert len(after) == BUDGET + later


def test_evict_mode_evicts_the_compressed_prompt_while_decoding(model):
    document = random_ids(1, DOCUMENT, seed=7)
    cache = PrunedCache(SnapKV(budget=BUDGET, window=4))
    with torch.no_grad():
        cache.prefill(model, document)
        turns(model, cache, DOCUMENT)
    for layer in cache.pruned_layers():
        held = layer.positions[0][layer.valid[0]]
        assert int(layer.valid[0].sum(-1).max()) == BUDGET
        assert int((held < DOCUMENT).sum()) < BUDGET * layer.num_heads  # the context gave way to the turns


@pytest.mark.parametrize("policy, quantization", [
    (AdaKV(SnapKV(budget=BUDGET, window=4)), None),  # per-head storage
    (SnapKV(budget=BUDGET, window=4), KVQuant(bits=4, group_size=8, residual=8)),
    (KVCompose(budget=0.25, window=4), None),  # cross-layer allocation at the end of the prompt
], ids=["adakv", "quantized", "kvcompose"])
def test_append_holds_every_later_token_whatever_the_storage(model, policy, quantization):
    cache = PrunedCache(policy, after_prompt="append", quantization=quantization)
    settings = {"max_new_tokens": 30, "do_sample": False, "pad_token_id": 0}
    model.generate(random_ids(1, DOCUMENT, seed=8), cache=cache, **settings)
    for layer in cache.pruned_layers():
        compressed = int((layer.positions[0][layer.valid[0]] < DOCUMENT).sum())
        later = int((layer.positions[0][layer.valid[0]] >= DOCUMENT).sum())
        assert compressed < DOCUMENT * layer.num_heads  # the prompt was compressed
        assert later == 29 * layer.num_heads  # every generated token fed back is held, in every head


def test_report_says_the_mode_and_a_pending_allocation(model):
    cache = PrunedCache(KVCompose(budget=0.25, window=4), after_prompt="append")
    with torch.no_grad():
        model(random_ids(1, 200, seed=9), cache=cache, use_cache=True)
    report = cache.report()
    assert report.allocation_pending and not report.prompt_done
    assert "cross-layer allocation pending" in str(report) and "the prompt has not ended yet" in str(report)
    assert all(row.kept == 200 for row in report.layers)
    cache.end_prefill()
    report = cache.report()
    assert not report.allocation_pending and report.prompt_done and report.after_prompt == "append"
    assert all(row.kept < 200 for row in report.layers)


def test_bad_modes_are_refused():
    with pytest.raises(ValueError, match=r"after_prompt must be one of \('evict', 'append'\), got 'once'"):
        PrunedCache(H2O(budget=64), after_prompt="once")
    with pytest.raises(ValueError, match="LazyLLM prunes the computation .* 'evict' only"):
        PrunedCache(LazyLLM(), after_prompt="append")
