"""Budgets hold after prefill and after every decoding step; sinks and window are always kept; the
positions of kept slots are the true positions (their keys equal the full cache's keys there)."""

import pytest
import torch
from tiny_models import random_ids, tiny_model
from transformers import DynamicCache

from kvpress import PrunedCache, PrunedLayer
from kvpress.policies import H2O, TOVA, Knorm, RandomPolicy, SnapKV, StreamingLLM

POLICIES = [
    H2O(budget=24, sinks=2, window=6),
    SnapKV(budget=24, sinks=2, window=6, kernel=3),
    TOVA(budget=24, sinks=2, window=6),
    Knorm(budget=24, sinks=2, window=6),
    StreamingLLM(budget=24, sinks=2, window=6),
    RandomPolicy(budget=24, sinks=2, window=6, seed=3),
]


def decode(model, ids, cache, steps):
    """Prefill then greedy steps by hand; yields after every forward."""
    with torch.no_grad():
        out = model(ids, cache=cache)
        yield
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            out = model(token, cache=cache)
            yield


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_budget_sinks_window_and_true_positions(policy):
    model = tiny_model("llama", "sdpa")
    ids = random_ids(1, 60)
    cache = PrunedCache(policy)
    for _ in decode(model, ids, cache, steps=12):
        for layer in cache.layers:
            assert layer.kept_slots <= 24
            pos = layer.positions[0]  # [Hkv, P]
            seen = layer.seen
            for p in (0, 1, *range(seen - 6, seen)):
                assert (pos == p).any(-1).all(), f"position {p} missing"
            assert torch.equal(pos, pos.sort(-1).values), "slots must stay in temporal order"
    # keys of kept slots are the full cache's keys at those positions
    full = DynamicCache()
    with torch.no_grad():
        model(torch.cat([ids, torch.zeros(1, 0, dtype=torch.long)], 1), cache=full)
    for layer, ref in zip(cache.layers, full.layers):
        prompt_slots = layer.positions[0] < 60  # [Hkv, P]
        for h in range(layer.num_heads):
            positions = layer.positions[0, h][prompt_slots[h]]
            assert torch.allclose(layer.keys[0, h][prompt_slots[h]], ref.keys[0, h, positions], atol=1e-5)


def test_float_budget_is_a_fraction_of_tokens_seen():
    model = tiny_model("llama", "eager")
    cache = PrunedCache(H2O(budget=0.5, window=4))
    steps = list(decode(model, random_ids(1, 40), cache, steps=10))
    assert len(steps) == 11
    for layer in cache.layers:
        assert layer.seen == 50
        assert layer.kept_slots == 25


def test_slack_bounds_the_layer_and_amortises_compaction():
    model = tiny_model("llama", "sdpa")
    cache = PrunedCache(H2O(budget=16, window=4), slack=4)
    sizes = []
    for _ in decode(model, random_ids(1, 30), cache, steps=12):
        sizes.append(cache.layers[0].kept_slots)
    assert max(sizes) <= 20
    assert sizes[0] == 16 and 20 in sizes
    assert cache.layers[0].evictions < 12


def test_report_counts_layers_bytes_and_ratio():
    model = tiny_model("llama", "sdpa")
    cache = PrunedCache(H2O(budget=16, window=4))
    list(decode(model, random_ids(1, 40), cache, steps=4))
    report = cache.report()
    assert len(report.layers) == 3
    for row, layer in zip(report.layers, cache.layers):
        assert isinstance(layer, PrunedLayer)
        assert (row.seen, row.kept) == (44, 16)
        tensors = (layer.keys, layer.values, layer.valid, layer.positions, layer.scores, layer.real_seen)
        expected = sum(t.untyped_storage().nbytes() for t in tensors)  # whole buffers, capacity included
        assert row.bytes == expected
        kv_storage = sum(t.untyped_storage().nbytes() for t in (layer.keys, layer.values))
        assert kv_storage <= 1.1 * 16 * (layer.keys[0, 0, 0].nbytes + layer.values[0, 0, 0].nbytes) * 2
        assert row.evictions == 5
    assert report.total_bytes == sum(r.bytes for r in report.layers)
    assert report.ratio == pytest.approx(16 / 44)
    assert "total bytes" in str(report)
