import math

import torch
from policy_helpers import prefill, tiny_model, token_ids

from kvpress.policies import VATP, GraphKV, SnapKV
from kvpress.policies.graphkv import propagate_decay


def naive_propagation(scores, keys, candidates, seeds, neighbours, rounds):
    """The update rule with an explicit cosine matrix and Python loops, one head. Ties go to the later
    slot (the paper names no rule; it is the one every selection of the library follows)."""
    n = len(scores)
    cos = [[max(0.0, float(torch.nn.functional.cosine_similarity(keys[i], keys[j], dim=0))) for j in range(n)]
           for i in range(n)]
    scores, chosen = list(scores), set()
    for _ in range(rounds):
        open_nodes = [j for j in range(n) if candidates[j] and j not in chosen]
        new_seeds = sorted(open_nodes, key=lambda j: (-scores[j], -j))[:seeds]
        chosen |= set(new_seeds)
        decay = [0.0] * n
        for i in new_seeds:
            targets = [j for j in range(n) if candidates[j] and j not in chosen]
            for j in sorted(targets, key=lambda j: (-cos[i][j], -j))[:neighbours]:
                decay[j] += cos[i][j]
        scores = [s - d * s for s, d in zip(scores, decay)]
    return scores


def angles(*degrees):
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees])


def test_hand_built_graph_one_seed():
    # node 0 is the seed; nodes 1 and 3 are its two nearest neighbours (cos 0.9 and 0.5)
    keys = angles(0, math.degrees(math.acos(0.9)), 90, 60)
    scores = torch.tensor([1.0, 0.8, 0.7, 0.5])
    out = propagate_decay(scores.view(1, 1, 4), keys.view(1, 1, 4, 2), torch.ones(1, 1, 4, dtype=torch.bool),
                          seeds=1, neighbours=2, rounds=1)
    torch.testing.assert_close(out.view(4), torch.tensor([1.0, 0.8 * (1 - 0.9), 0.7, 0.5 * (1 - 0.5)]))
    assert out.view(4).argsort(descending=True).tolist() == [0, 2, 3, 1]  # the duplicate of the seed drops


def test_two_seeds_add_their_decay_and_protected_nodes_are_not_in_the_graph():
    keys = angles(0, 10, 40, 80, 90, 170)
    scores = torch.tensor([0.9, 0.3, 0.6, 0.2, 0.8, 0.5])
    candidates = torch.tensor([True, True, True, True, True, False])
    out = propagate_decay(scores.view(1, 1, 6), keys.view(1, 1, 6, 2), candidates.view(1, 1, 6), 2, 2, 1)
    expected = naive_propagation(scores.tolist(), keys, candidates.tolist(), 2, 2, 1)
    torch.testing.assert_close(out.view(6), torch.tensor(expected))
    assert out[0, 0, 5] == 0.5  # not a node: untouched


def test_matches_naive_reference_on_random_graphs_over_rounds():
    gen = torch.Generator().manual_seed(0)
    for rounds, seeds, neighbours in ((1, 1, 2), (2, 2, 1), (3, 2, 3)):
        keys = torch.randn(12, 4, generator=gen)
        scores = torch.rand(12, generator=gen)
        candidates = torch.rand(12, generator=gen) > 0.2
        out = propagate_decay(scores.view(1, 1, 12), keys.view(1, 1, 12, 4), candidates.view(1, 1, 12),
                              seeds, neighbours, rounds)
        expected = naive_propagation(scores.tolist(), keys, candidates.tolist(), seeds, neighbours, rounds)
        torch.testing.assert_close(out.view(12), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_layer_scores_follow_the_propagation_of_the_inner_scores():
    model, ids = tiny_model(), token_ids(24)
    inner = SnapKV(budget=1.0, window=4, kernel=3)
    policy = GraphKV(inner, seeds=3, neighbours=2, rounds=2)
    cache = prefill(model, ids, policy)
    layer = cache.layers[1]
    base = inner.score(layer)
    candidates = layer.valid & ~inner.protected(layer)
    got = policy.score(layer)
    for head in range(2):
        expected = naive_propagation(base[0, head].tolist(), layer.keys[0, head].float(),
                                     candidates[0, head].tolist(), 3, 2, 2)
        torch.testing.assert_close(got[0, head], torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_wrappers_compose_and_the_innermost_budget_is_enforced():
    model, ids = tiny_model(layers=3), token_ids(40)
    cache = prefill(model, ids, GraphKV(VATP(SnapKV(budget=0.2, window=2, kernel=3), sink_tokens=1)),
                    extra=token_ids(5, seed=2))
    for layer in cache.layers:
        assert layer.valid.sum(-1).tolist() == [[int(45 * 0.2)] * 2]
        assert 0 in layer.positions[0, 0][layer.valid[0, 0]].tolist()  # VATP's sink survives
    out = model.generate(ids, max_new_tokens=4, do_sample=False,
                         cache=__import__("kvpress").PrunedCache(GraphKV(VATP(SnapKV(budget=0.2)))))
    assert out.shape == (1, 44)
