import torch
from policy_helpers import eager_reference, group_sum, kept_positions, prefill, tiny_model, token_ids

from kvpress.policies import H2O, VATP, Knorm, SnapKV


def test_score_is_accumulated_attention_times_value_l1_norm():
    model, ids = tiny_model(), token_ids(20)
    policy = VATP(H2O(budget=1.0, window=0), sink_tokens=0)
    cache = prefill(model, ids, policy)
    for layer, (attention, _, values) in zip(cache.layers, eager_reference(model, ids)):
        expected = group_sum(attention, 2).sum(-2) * values.abs().sum(-1)  # [B, Hkv, T]
        torch.testing.assert_close(policy.score(layer).double(), expected, rtol=1e-4, atol=1e-5)


def test_eviction_keeps_sinks_window_and_top_value_weighted_scores():
    model, ids = tiny_model(), token_ids(30)
    budget, window, sinks = 14, 3, 2
    cache = prefill(model, ids, VATP(H2O(budget=budget, window=window), sink_tokens=sinks))
    for layer, (attention, _, values) in zip(cache.layers, eager_reference(model, ids)):
        product = (group_sum(attention, 2).sum(-2) * values.abs().sum(-1))[0]  # [Hkv, T]
        for head in range(2):
            middle = product[head, sinks: 30 - window]
            top = (middle.topk(budget - window - sinks).indices + sinks).tolist()
            expected = sorted(list(range(sinks)) + top + list(range(30 - window, 30)))
            assert kept_positions(layer, head=head) == expected


def test_value_norms_change_the_choice_of_the_inner_policy():
    model, ids = tiny_model(), token_ids(40)
    plain = prefill(model, ids, H2O(budget=12, window=2))
    weighted = prefill(model, ids, VATP(H2O(budget=12, window=2), sink_tokens=0))
    assert any(kept_positions(a, head=h) != kept_positions(b, head=h)
               for a, b in zip(plain.layers, weighted.layers) for h in range(2))


def test_wraps_snapkv_and_negative_scoring_policies():
    model, ids = tiny_model(), token_ids(30)
    for inner in (SnapKV(budget=10, window=4, kernel=3), Knorm(budget=10)):
        cache = prefill(model, ids, VATP(inner, sink_tokens=2), extra=token_ids(3, seed=7))
        for layer in cache.layers:
            assert int(layer.valid.sum(-1).max()) == 10
            assert {0, 1} <= set(kept_positions(layer))


def test_knorm_scores_are_shifted_not_flipped():
    model, ids = tiny_model(), token_ids(25)
    policy = VATP(Knorm(budget=1.0), sink_tokens=0)
    layer = prefill(model, ids, policy).layers[0]
    norm = -layer.keys.float().norm(dim=-1)
    shifted = norm - norm.amin(-1, keepdim=True)
    torch.testing.assert_close(policy.score(layer), shifted * layer.values.float().abs().sum(-1))
