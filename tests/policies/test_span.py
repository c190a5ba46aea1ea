"""Span pooling against a loop over each slot's window, and end to end around H2O."""

import pytest
import torch
from policy_helpers import prefill, tiny_model, token_ids

from kvpress import PrunedCache
from kvpress.composition import CompositionError
from kvpress.policies import H2O, AdaKV, SnapKV, Span
from kvpress.policies.snapkv import pool_slots


def naive_pool(scores, valid, kernel, pooling):
    """Each kept slot pooled with its `kernel // 2` nearest kept slots on either side, in slot order:
    holes (padding, slots dropped in place while decoding) are skipped, not counted in the window."""
    out = torch.full_like(scores, float("nan"))
    half = kernel // 2
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            kept = [j for j in range(scores.shape[2]) if valid[b, h, j]]
            for rank, s in enumerate(kept):
                window = [scores[b, h, j] for j in kept[max(0, rank - half):rank + half + 1]]
                out[b, h, s] = max(window) if pooling == "max" else sum(window) / len(window)
    return out


def span_pool(scores, valid, kernel, pooling):
    return pool_slots(scores, kernel, pooling, valid)


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_pooling_equals_a_loop_over_each_window_of_the_nearest_kept_slots(pooling, kernel):
    generator = torch.Generator().manual_seed(kernel)
    scores = torch.randn(2, 3, 17, generator=generator)
    valid = torch.rand(2, 3, 17, generator=generator) > 0.3
    torch.testing.assert_close(span_pool(scores, valid, kernel, pooling)[valid],
                               naive_pool(scores, valid, kernel, pooling)[valid])


def test_a_hole_never_lends_its_score_nor_narrows_the_window():
    scores = torch.tensor([[[0.0, 100.0, 1.0, 2.0]]])
    valid = torch.tensor([[[True, False, True, True]]])
    # slot 0's nearest kept neighbour is slot 2 (the hole at slot 1 is skipped)
    assert span_pool(scores, valid, 3, "max")[valid].tolist() == [1.0, 2.0, 2.0]


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


@torch.no_grad()
def test_while_decoding_holes_are_skipped_not_counted(monkeypatch):
    """In-place decoding eviction leaves holes; Span's window then reaches the nearest kept slots, as its
    docstring and docs/decisions.md say (it used to count the holes)."""
    model = tiny_model()
    seen = []
    original = Span.score

    def spy(self, layer):
        pooled = original(self, layer)
        seen.append((self.inner.score(layer).float().clone(), layer.valid.clone(), pooled.clone()))
        return pooled

    monkeypatch.setattr(Span, "score", spy)
    cache = PrunedCache(Span(H2O(budget=12, window=2), kernel=5), slack=4)
    model.generate(token_ids(30, seed=5), cache=cache, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with_holes = [(scores, valid, pooled) for scores, valid, pooled in seen if not bool(valid.all())]
    assert with_holes, "no scoring saw a hole"
    for scores, valid, pooled in with_holes:
        torch.testing.assert_close(pooled[valid], naive_pool(scores, valid, 5, "max")[valid])


def test_bad_kernel_and_adakv_inside_are_refused():
    with pytest.raises(ValueError, match="kernel"):
        Span(H2O(), kernel=4)
    with pytest.raises(ValueError, match="pooling"):
        Span(H2O(), pooling="median")
    with pytest.raises(CompositionError, match="adakv"):
        Span(AdaKV(SnapKV()))
