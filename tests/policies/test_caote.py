import torch
from policy_helpers import eager_reference, group_sum, prefill, tiny_model, token_ids

from kvpress.policies import CAOTE, H2O, SnapKV


def measured_output_change(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """For one attention row `probs [T]` over `values [T, D]`: `||o - o_without_j||` for every `j`,
    recomputing the renormalised attention output with slot `j` removed."""
    full = probs @ values
    changes = []
    for j in range(probs.shape[0]):
        keep = torch.ones_like(probs, dtype=torch.bool)
        keep[j] = False
        without = (probs[keep] / probs[keep].sum()) @ values[keep]
        changes.append((full - without).norm())
    return torch.stack(changes)


def test_closed_form_equals_measured_change_of_attention_output():
    # one query head per KV head: the last row's probabilities are the head's own attention
    model, ids = tiny_model(heads=2, kv_heads=2), token_ids(18)
    policy = CAOTE(SnapKV(budget=1.0, window=1, kernel=1))
    cache = prefill(model, ids, policy)
    for layer, (attention, _, values) in zip(cache.layers, eager_reference(model, ids)):
        score = policy.score(layer).double()
        for head in range(2):
            expected = measured_output_change(attention[0, head, -1], values[0, head])
            torch.testing.assert_close(score[0, head], expected, rtol=2e-3, atol=1e-5)


def test_grouped_accumulated_scores_become_mean_attention():
    model, ids = tiny_model(), token_ids(20)
    policy = CAOTE(H2O(budget=1.0, window=0))
    cache = prefill(model, ids, policy)
    for layer, (attention, _, values) in zip(cache.layers, eager_reference(model, ids)):
        mass = group_sum(attention, 2).sum(-2)[0]  # [Hkv, T]
        alpha = mass / mass.sum(-1, keepdim=True)
        output = torch.einsum("ht,htd->hd", alpha, values[0])
        expected = alpha / (1 - alpha) * (output[:, None] - values[0]).norm(dim=-1)
        torch.testing.assert_close(policy.score(layer)[0].double(), expected, rtol=1e-3, atol=1e-6)


def test_fast_variant_uses_the_mean_value():
    model, ids = tiny_model(), token_ids(16)
    policy = CAOTE(H2O(budget=1.0, window=0), fast=True)
    layer = prefill(model, ids, policy).layers[1]
    _, _, values = eager_reference(model, ids)[1]
    mass = layer.scores[0].double()
    alpha = mass / mass.sum(-1, keepdim=True)
    expected = alpha / (1 - alpha) * (values[0].mean(1, keepdim=True) - values[0]).norm(dim=-1)
    torch.testing.assert_close(policy.score(layer)[0].double(), expected, rtol=1e-3, atol=1e-6)


def test_evicts_by_output_error_within_the_inner_budget():
    model, ids = tiny_model(), token_ids(30)
    cache = prefill(model, ids, CAOTE(SnapKV(budget=9, window=3, kernel=1)), extra=token_ids(4, seed=3))
    for layer in cache.layers:
        assert int(layer.valid.sum(-1).max()) <= 9 + 0
        assert set(range(31, 34)) <= set(layer.positions[0, 0][layer.valid[0, 0]].tolist())
