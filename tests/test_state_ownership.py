"""Policy state belongs to the cache: reset and reuse, beam reordering, sharing one policy object
between caches, and beam search, for every registered policy."""

import gc
import weakref

import pytest
import torch
from registry_policies import generate, make_policy, prefill
from tiny_models import random_ids, tiny_model
from transformers import DynamicCache

from kvpress import PrunedCache
from kvpress.policies import REGISTRY

NAMES = sorted(REGISTRY)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", "eager")


@torch.no_grad()
def greedy(model, ids, cache, steps, swap_at=None):
    """Greedy tokens `[B, steps]` fed one at a time; at step `swap_at` the two rows of the batch and of
    the cache are swapped (`reorder_cache([1, 0])`), and the returned rows are swapped back."""
    logits = prefill(model, ids, cache)[:, -1]
    tokens = []
    for step in range(steps):
        token = logits.argmax(-1, keepdim=True)
        if step == swap_at:
            cache.reorder_cache(torch.tensor([1, 0]))
            token = token.flip(0)
            tokens = [t.flip(0) for t in tokens]
        tokens.append(token)
        logits = model(token, cache=cache, use_cache=True).logits[:, -1]
    out = torch.cat(tokens, dim=1)
    return out.flip(0) if swap_at is not None else out


@pytest.mark.parametrize("name", NAMES)
def test_reset_and_reuse_gives_the_tokens_of_a_fresh_cache(model, name):
    ids = random_ids(1, 40, seed=3)
    policy = make_policy(name, 16)
    reused = PrunedCache(policy)
    greedy(model, random_ids(1, 30, seed=9), reused, 5)  # a different prompt first
    reused.reset()
    assert torch.equal(greedy(model, ids, reused, 8), greedy(model, ids, PrunedCache(policy), 8))


@pytest.mark.parametrize("name", NAMES)
def test_reordering_rows_mid_generation_equals_running_them_swapped(model, name):
    first, second = random_ids(1, 36, seed=4), random_ids(1, 36, seed=5)
    policy = make_policy(name, 14)
    swapped = greedy(model, torch.cat([second, first]), PrunedCache(policy), 9)
    reordered = greedy(model, torch.cat([first, second]), PrunedCache(policy), 9, swap_at=4)
    # `greedy` returns rows in the order of the start, (first, second)
    assert torch.equal(reordered.flip(0), swapped)


@pytest.mark.parametrize("name", NAMES)
def test_one_policy_object_serves_two_caches_in_alternation(model, name):
    policy = make_policy(name, 12)
    prompts = [random_ids(1, 32, seed=6), random_ids(1, 28, seed=7)]
    alone = [greedy(model, ids, PrunedCache(policy), 6) for ids in prompts]
    caches = [PrunedCache(policy), PrunedCache(policy)]
    logits = [prefill(model, ids, cache)[:, -1] for ids, cache in zip(prompts, caches)]
    tokens = [[], []]
    for _ in range(6):
        for row in (0, 1):  # one step of each cache in turn
            token = logits[row].argmax(-1, keepdim=True)
            tokens[row].append(token)
            with torch.no_grad():
                logits[row] = model(token, cache=caches[row], use_cache=True).logits[:, -1]
    for row in (0, 1):
        assert torch.equal(torch.cat(tokens[row], dim=1), alone[row])


@pytest.mark.parametrize("name", NAMES)
def test_beam_search_runs_and_equals_dynamic_cache_when_nothing_is_evicted(model, name):
    ids = random_ids(1, 24, seed=8)
    settings = {"max_new_tokens": 6, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
    reference = model.generate(ids, cache=DynamicCache(config=model.config), **settings)
    out = generate(model, ids, PrunedCache(make_policy(name, 1.0, never_evicts=True)), **settings)
    assert torch.equal(out, reference)
    evicting = PrunedCache(make_policy(name, 12))
    out = generate(model, ids, evicting, **settings)
    assert out.shape == reference.shape
    # LazyLLM (schedule at layer 1) computes every token in layers 0 and 1 and fewer above
    pruned = evicting.layers[2:] if getattr(evicting.policy, "runs_decoder_layers", False) else evicting.layers
    assert all(layer.valid.sum(-1).max() < layer.seen for layer in pruned)


def test_the_attention_handoff_keeps_no_cache_alive_after_an_exception(model):
    cache = PrunedCache(make_policy("h2o", 8))
    keys = torch.zeros(1, 2, 3, 16)
    cache.update(keys, keys, 0)  # an update whose attention call never comes (as if the forward raised)
    ref = weakref.ref(cache)
    del cache
    gc.collect()
    assert ref() is None
