"""PyramidKV (per-layer budgets) and AdaKV (per-head budgets) against the uniform budget."""

from types import SimpleNamespace

import pytest
import torch
from policy_helpers import prefill, tiny_model, token_ids

from kvpress.policies import AdaKV, PyramidKV, SnapKV
from kvpress.policies._layer_schedule import linear_layer_counts


def pyramid_reference(mean, seen, window, layers, beta):
    """policies.md section 11, real-valued: layer budgets outside the window."""
    free = mean - window
    lo = free / beta
    hi = 2 * free - lo
    if hi >= seen - window:
        hi = seen - window
        lo = 2 * free - hi
    return [hi - i * (hi - lo) / (layers - 1) for i in range(layers)]


@pytest.mark.parametrize("mean,seen,layers,beta", [(40, 400, 8, 20.0), (30, 45, 5, 20.0), (25, 200, 30, 3.0)])
def test_pyramid_counts_follow_the_schedule_and_sum_to_the_uniform_total(mean, seen, layers, beta):
    window = 8
    counts = [int(linear_layer_counts(torch.tensor([mean - window]), torch.tensor([seen - window]), i, layers,
                                      beta)) for i in range(layers)]
    expected = pyramid_reference(mean, seen, window, layers, beta)
    assert sum(counts) == layers * (mean - window)
    assert all(abs(c - e) <= 1 for c, e in zip(counts, expected))
    assert counts == sorted(counts, reverse=True)


def test_pyramidkv_keeps_the_uniform_total_over_layers_of_a_model():
    model, ids = tiny_model(layers=4), token_ids(60)
    pyramid = prefill(model, ids, PyramidKV(SnapKV(budget=16, window=4, kernel=3)), extra=token_ids(3, seed=2))
    kept = [int(layer.valid[0, 0].sum()) for layer in pyramid.layers]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]
    assert abs(sum(kept) - 4 * 16) <= 1
    assert all(layer.valid.sum(-1).min() == layer.valid.sum(-1).max() for layer in pyramid.layers)


class FakeLayer(SimpleNamespace):
    """Just what AdaKV(SnapKV) reads of a layer: slots, positions and the SnapKV score state."""

    def state(self, policy):
        return SimpleNamespace(scores=self.scores)


def fake_layer(scores, window_start):
    heads, slots = scores.shape
    positions = torch.arange(slots).expand(1, heads, slots)
    return FakeLayer(scores=scores[None].float(), valid=torch.ones(1, heads, slots, dtype=torch.bool),
                     positions=positions, real_seen=torch.tensor([slots]), num_heads=heads, num_slots=slots,
                     window_start=window_start, budget=12, allocation=None)


def naive_adakv_counts(scores, budget, window, floor):
    heads, slots = scores.shape
    free = budget - window
    pairs = sorted(((float(scores[h, p]), p, h) for h in range(heads) for p in range(slots - window)), reverse=True)
    picked = [0] * heads
    for _, _, h in pairs[: heads * free]:
        picked[h] += 1
    return [round(n * (1 - floor) + floor * free) + window for n in picked]


def test_adakv_counts_come_from_one_top_k_over_the_heads_of_a_layer():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 30, generator=gen) * torch.tensor([[4.0], [1.0], [0.5], [2.0]])
    policy = AdaKV(SnapKV(budget=12, window=3, kernel=1), floor=0.2)
    counts = policy.keep_counts(fake_layer(scores, 27))[0].tolist()
    assert counts == naive_adakv_counts(scores, 12, 3, 0.2)
    assert len(set(counts)) > 1
    assert abs(sum(counts) - 4 * 12) <= 4


def test_adakv_keeps_the_uniform_total_per_layer_with_different_head_counts():
    model, ids = tiny_model(layers=3, heads=4, kv_heads=4), token_ids(50)
    cache = prefill(model, ids, AdaKV(SnapKV(budget=12, window=3, kernel=3)))
    differ = False
    for layer in cache.layers:
        per_head = layer.valid[0].sum(-1)
        assert abs(int(per_head.sum()) - 4 * 12) <= 4  # within one slot per head
        differ |= len(set(per_head.tolist())) > 1
        assert layer.num_slots == int(per_head.max())  # the cache masks the holes
    assert differ


def test_adakv_while_decoding_stays_within_the_total_and_generates():
    model, ids = tiny_model(layers=2, heads=4, kv_heads=4), token_ids(40)
    cache = prefill(model, ids, AdaKV(SnapKV(budget=10, window=2, kernel=3)), extra=token_ids(6, seed=3))
    for layer in cache.layers:
        assert int(layer.valid[0].sum()) <= 4 * 10 + 4
    out = model.generate(ids, max_new_tokens=5, do_sample=False,
                         cache=__import__("kvpress").PrunedCache(AdaKV(SnapKV(budget=0.3, window=2))))
    assert out.shape == (1, 45)
