import pytest
import torch
from policy_helpers import eager_reference, group_sum, kept_positions, prefill, tiny_model, token_ids

from kvpress.policies import A2SF, H2O


def naive_a2sf(attention: torch.Tensor, forgetting: float, kv_heads: int) -> torch.Tensor:
    """`S(j) = sum_q forgetting^(n-1-q) A[q, j]`, straight from the full matrix: `[B, Hkv, T]`."""
    rows = attention.shape[-2]
    weights = torch.tensor([forgetting ** (rows - 1 - q) for q in range(rows)], dtype=torch.float64)
    return torch.einsum("bhqs,q->bhs", group_sum(attention, kv_heads), weights)


def test_prefill_score_is_forgetting_weighted_column_sum():
    model, ids = tiny_model(), token_ids(24)
    cache = prefill(model, ids, A2SF(budget=1.0, window=0, forgetting=0.8))
    for layer, (attention, _, _) in zip(cache.layers, eager_reference(model, ids)):
        expected = naive_a2sf(attention, 0.8, kv_heads=2)
        torch.testing.assert_close(layer.scores.double(), expected, rtol=1e-4, atol=1e-5)


def test_forgetting_recurrence_over_decode_steps():
    model, ids, extra = tiny_model(), token_ids(16), token_ids(5, seed=2)
    policy = A2SF(budget=1.0, window=0, forgetting=0.7)
    cache = prefill(model, ids, policy, extra)
    full = torch.cat([ids, extra], dim=1)
    for layer, (attention, _, _) in zip(cache.layers, eager_reference(model, full)):
        expected = naive_a2sf(attention, 0.7, kv_heads=2)
        torch.testing.assert_close(policy.score(layer).double(), expected, rtol=1e-4, atol=1e-5)


def test_decoding_keeps_budget_and_window():
    model, ids, extra = tiny_model(), token_ids(20), token_ids(3, seed=3)
    budget, window, forgetting = 10, 3, 0.6
    cache = prefill(model, ids, A2SF(budget=budget, window=window, forgetting=forgetting), extra)
    layer = cache.layers[0]
    assert int(layer.valid.sum(-1).max()) == budget
    seen = ids.shape[1] + extra.shape[1]
    for head in range(2):
        kept = kept_positions(layer, head=head)
        assert set(range(seen - window, seen)) <= set(kept)
        scores = layer.scores[0, head][layer.valid[0, head]]
        assert torch.isfinite(scores).all()


def test_prefill_eviction_keeps_naive_top_k_outside_window():
    model, ids = tiny_model(), token_ids(30)
    budget, window, forgetting = 12, 4, 0.9
    cache = prefill(model, ids, A2SF(budget=budget, window=window, forgetting=forgetting))
    for layer, (attention, _, _) in zip(cache.layers, eager_reference(model, ids)):
        scores = naive_a2sf(attention, forgetting, kv_heads=2)[0]  # [Hkv, T]
        for head in range(2):
            outside = scores[head, : 30 - window]
            top = outside.topk(budget - window).indices.tolist()
            assert kept_positions(layer, head=head) == sorted(top + list(range(30 - window, 30)))


def test_forgetting_one_is_h2o():
    model, ids, extra = tiny_model(), token_ids(12), token_ids(3, seed=4)
    a2sf = prefill(model, ids, A2SF(budget=1.0, window=0, forgetting=1.0), extra)
    h2o = prefill(model, ids, H2O(budget=1.0, window=0), extra)
    for ours, base in zip(a2sf.layers, h2o.layers):
        torch.testing.assert_close(ours.scores, base.scores)


@pytest.mark.parametrize("value", [0.0, 1.5, -0.1, True])
def test_forgetting_outside_unit_interval_is_rejected(value):
    with pytest.raises(ValueError, match="forgetting"):
        A2SF(forgetting=value)


def test_prefill_only_mode_does_not_evict_while_decoding():
    model, ids, extra = tiny_model(), token_ids(20), token_ids(4, seed=5)
    cache = prefill(model, ids, A2SF(budget=8, window=2, prefill_only=True), extra)
    assert cache.layers[0].kept_slots == 8 + 4
