"""Memory is what the report says and what users compare against: the no-op cache holds at most 1.05x
the key/value bytes of `DynamicCache` at every step (measured on DynamicCache's own tensors), and a
pruned layer's capacity stays within 1/20 of what it keeps plus the cache's slack."""

import math

import pytest
import torch
from tiny_models import random_ids, tiny_model
from transformers import DynamicCache

from kvpress import PrunedCache
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
