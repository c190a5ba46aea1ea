"""Span pooling against a loop over each slot's window, and end to end around H2O."""

import pytest
import torch
from policy_helpers import prefill, tiny_model, token_ids

from kvpress.composition import CompositionError
from kvpress.policies import H2O, AdaKV, SnapKV, Span
from kvpress.policies.span import pool_valid


def naive_pool(scores, valid, kernel, pooling):
    out = scores.clone()
    half = kernel // 2
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            for s in range(scores.shape[2]):
                if not valid[b, h, s]:
                    continue
                window = [scores[b, h, j] for j in range(max(0, s - half), min(scores.shape[2], s + half + 1))
                          if valid[b, h, j]]
                out[b, h, s] = max(window) if pooling == "max" else sum(window) / len(window)
    return out


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_pooling_equals_a_loop_over_each_window_of_valid_slots(pooling, kernel):
    generator = torch.Generator().manual_seed(kernel)
    scores = torch.randn(2, 3, 17, generator=generator)
    valid = torch.rand(2, 3, 17, generator=generator) > 0.3
    torch.testing.assert_close(pool_valid(scores, valid, kernel, pooling), naive_pool(scores, valid, kernel, pooling))


def test_an_invalid_slot_never_lends_its_score():
    scores = torch.tensor([[[0.0, 100.0, 1.0, 2.0]]])
    valid = torch.tensor([[[True, False, True, True]]])
    assert pool_valid(scores, valid, 3, "max").tolist() == [[[0.0, 100.0, 2.0, 2.0]]]


@torch.no_grad()
def test_span_around_h2o_keeps_the_top_slots_of_the_pooled_h2o_score():
    model = tiny_model()
    ids = token_ids(40, seed=3)
    reference = prefill(model, ids, H2O(budget=1.0, window=2))
    cache = prefill(model, ids, Span(H2O(budget=12, window=2), kernel=5))
    for layer, full in zip(cache.layers, reference.layers):
        pooled = naive_pool(full.scores, full.valid, 5, "max")[0]
        for head in range(pooled.shape[0]):
            kept = sorted(layer.positions[0, head][layer.valid[0, head]].tolist())
            # max pooling copies a score to its neighbours: ties go to the later slot, as policies.md asks
            best = sorted(range(38), key=lambda s: (float(pooled[head, s]), s), reverse=True)[:10]
            assert kept == sorted(best + [38, 39])


def test_bad_kernel_and_adakv_inside_are_refused():
    with pytest.raises(ValueError, match="kernel"):
        Span(H2O(), kernel=4)
    with pytest.raises(ValueError, match="pooling"):
        Span(H2O(), pooling="median")
    with pytest.raises(CompositionError, match="adakv"):
        Span(AdaKV(SnapKV()))
