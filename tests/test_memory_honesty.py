"""Memory is what the report says and what users compare against: the no-op cache holds at most 1.05x
the key/value bytes of `DynamicCache` at every step (measured on DynamicCache's own tensors), and a
pruned layer's capacity stays within 1/20 of what it keeps plus the cache's slack."""

import math

import pytest
import torch
from tiny_models import random_ids, tiny_model
from transformers import DynamicCache

from kvpress import KVQuant, PrunedCache
from kvpress.policies import H2O, SnapKV


def dynamic_kv_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@pytest.mark.parametrize("prompt", [1, 37, 1000])
def test_no_op_cache_holds_at_most_1_05x_dynamic_cache_bytes_at_every_step(prompt):
    model = tiny_model("llama", "sdpa")
    dynamic, pruned = DynamicCache(), PrunedCache(None)
    ratios = []
    with torch.no_grad():
        ids = random_ids(1, prompt)
        model(ids, cache=dynamic)
        model(ids, cache=pruned)
        for step in range(45):
            token = random_ids(1, 1, seed=step)
            model(token, cache=dynamic)
            model(token, cache=pruned)
            ours = sum(layer.slots.kv_nbytes for layer in pruned.layers)
            ratios.append(ours / dynamic_kv_bytes(dynamic))
    assert max(ratios) <= 1.05, max(ratios)
    assert [row.capacity for row in pruned.report().layers] == [layer.slots.capacity for layer in pruned.layers]


@pytest.mark.parametrize("slack", [0, 8])
@pytest.mark.parametrize("policy", [H2O(budget=40, window=4), SnapKV(budget=40, window=4)])
def test_a_pruned_layer_keeps_at_most_1_20th_headroom_plus_slack(policy, slack):
    model = tiny_model("llama", "sdpa")
    cache = PrunedCache(policy, slack=slack)
    model.generate(random_ids(1, 120), cache=cache, max_new_tokens=30, do_sample=False, pad_token_id=0)
    bound = 40 + slack + math.ceil(40 / 20)
    for row in cache.report().layers:
        assert row.kept <= 40 + slack
        assert row.capacity <= bound, (row.capacity, bound)


@pytest.mark.parametrize("family, overrides, policy, quantized", [
    ("llama", {}, H2O(budget=16, window=4), False),
    ("llama", {}, SnapKV(budget=16, window=4), True),
    ("mistral", {"sliding_window": 24}, H2O(budget=16, window=4), False),  # every layer slides
    ("gemma2", {"sliding_window": 24}, SnapKV(budget=16, window=4), False),  # sliding layers stay transformers'
])
def test_the_dynamic_cache_bytes_the_report_states_are_dynamic_cache_s_own(family, overrides, policy, quantized):
    """`report().dynamic_bytes`, the reference savings are stated against, equals the bytes a real
    `DynamicCache` holds after the same generation (a batch with left padding)."""
    model = tiny_model(family, "eager", **overrides)
    ids = random_ids(2, 40, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    settings = {"attention_mask": mask, "max_new_tokens": 9, "do_sample": False, "pad_token_id": 0}
    dynamic = DynamicCache(config=model.config)
    model.generate(ids, cache=dynamic, **settings)
    quantization = KVQuant(bits=4, group_size=8, residual=8) if quantized else None
    pruned = PrunedCache(policy, quantization=quantization)
    model.generate(ids, cache=pruned, **settings)
    report = pruned.report()
    assert report.dynamic_bytes == dynamic_kv_bytes(dynamic)
    assert report.vs_dynamic < 1  # it evicted: 16 of the 48 tokens (23 of a sliding layer) per row
