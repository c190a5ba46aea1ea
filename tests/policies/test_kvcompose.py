"""KVCompose: task-row scores, composite tokens and the global allocation against naive computations,
budgets summed over layers, decoding at the chosen sizes, batch rows independent."""

import math

import pytest
import torch
from policy_helpers import eager_reference, group_sum, tiny_model, token_ids
from tiny_models import left_pad

from kvpress import PrunedCache
from kvpress.policies import KVCompose
from kvpress.spec import parse_spec


def model_with_different_layers(layers: int = 4):
    """Layers from flat to peaked attention, so their composite scores differ."""
    model = tiny_model(layers=layers)
    for scale, layer in zip((0.1, 6.0, 12.0, 1.0), model.model.layers):
        layer.self_attn.q_proj.weight.data *= scale
    return model


@torch.no_grad()
def prompt_only(model, ids, policy, mask=None) -> PrunedCache:
    cache = PrunedCache(policy)
    model(ids, attention_mask=mask, cache=cache, use_cache=True)
    return cache


def kept(layer, row: int, head: int) -> list[int]:
    return sorted(layer.positions[row, head][layer.valid[row, head]].tolist())


def naive_allocation(scores, window, per_layer, structured, lower_bound=0, first_layer_max=True):
    """Per layer, slots each head keeps, from `scores`: one `[Hkv, T]` tensor per layer (one batch row,
    every slot real, the last `window` protected), by plain sorting and counting."""
    layers, heads, length = len(scores), scores[0].shape[0], scores[0].shape[1]
    ranked = [[sorted(head[:length - window].tolist(), reverse=True) for head in layer] for layer in scores]
    forced = lower_bound  # the reference floors no layer: `+1e9` on the first `lower_bound` ranks only
    entries = []
    if structured:
        composite = [[sum(ranked[l][h][i] for h in range(heads)) / heads for i in range(length - window)]
                     for l in range(layers)]
        if first_layer_max:
            composite[0] = [max(composite[l][i] for l in range(layers)) for i in range(length - window)]
        for l in range(layers):
            entries += [(math.inf if i < forced else composite[l][i], l, 0, i) for i in range(length - window)]
        total = layers * (per_layer - window)
    else:
        for l in range(layers):
            for h in range(heads):
                entries += [(math.inf if i < forced else ranked[l][h][i], l, h, i) for i in range(length - window)]
        total = layers * heads * (per_layer - window)
    entries.sort(key=lambda e: (-e[0], e[1], e[2], e[3]))
    counts = [[0] * heads for _ in range(layers)]
    for _, l, h, _ in entries[:total]:
        if structured:
            counts[l] = [c + 1 for c in counts[l]]
        else:
            counts[l][h] += 1
    return [[c + window for c in layer] for layer in counts]


def naive_task_max(attention: torch.Tensor, kv_heads: int, rows: int) -> torch.Tensor:
    """`attention [Hq, T, T]` of one row -> `[Hkv, T]`: for each KV head and column, the mean over the
    group's query heads of the largest probability over the last `rows` rows (NVIDIA kvpress
    `KVComposePress`: `MaxAggregator` over each query head's task rows, then `MeanAggregator` over
    the group), by plain loops."""
    heads, length = attention.shape[0], attention.shape[-1]
    group = heads // kv_heads
    out = torch.zeros(kv_heads, length, dtype=torch.float64)
    for g in range(kv_heads):
        for j in range(length):
            per_head = [max(float(attention[h, r, j]) for r in range(length - rows, length))
                        for h in range(g * group, (g + 1) * group)]
            out[g, j] = sum(per_head) / group
    return out


@pytest.mark.parametrize("agg_task", ["max", "mean"])
def test_scores_are_the_task_rows_aggregated_as_the_reference_plus_the_head_mean(agg_task):
    model, ids, window = tiny_model(layers=2), token_ids(24), 5
    policy = KVCompose(budget=10, window=window, add_v_norm=True, agg_task=agg_task)
    cache = prompt_only(model, ids, policy)
    for layer, (attention, _, values) in zip(cache.layers, eager_reference(model, ids)):
        if agg_task == "max":
            mass = naive_task_max(attention[0], 2, window)
        else:  # the sum over rows and query heads ranks as the reference's mean (one factor, every layer)
            mass = group_sum(attention, 2)[0, :, -window:].sum(1)  # [Hkv, T] over the task rows
        mass = mass * values[0].norm(dim=-1)
        expected = mass + mass.mean(0, keepdim=True)
        torch.testing.assert_close(policy.score(layer)[0].double(), expected, rtol=1e-4, atol=1e-6)


def test_default_aggregation_is_the_reference_row_maximum():
    assert KVCompose().agg_task == "max"


@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("lower_bound", [0, 3])
def test_allocation_equals_a_naive_ranking_of_composite_tokens(structured, lower_bound):
    model, ids = model_with_different_layers(), token_ids(40, seed=3)
    policy = KVCompose(budget=12, window=4, structured=structured, keep_token_lower_bound=lower_bound)
    cache = prompt_only(model, ids, policy)
    scores = [policy.score(layer)[0] for layer in cache.layers]
    expected = naive_allocation(scores, 4, 12, structured, lower_bound)
    counts = policy.allocate(cache.layers)
    assert [c[0].tolist() for c in counts] == expected
    cache.end_prefill()
    for layer, score, sizes in zip(cache.layers, scores, expected):
        for head, size in enumerate(sizes):
            # each head keeps the window and its own top slots: different positions per head
            order = sorted(range(36), key=lambda j: (-float(score[head, j]), -j))[:size - 4]
            assert kept(layer, 0, head) == sorted(order + list(range(36, 40)))


def test_a_flat_layer_may_keep_the_window_alone_as_in_the_reference():
    model, ids = model_with_different_layers(), token_ids(40, seed=3)
    policy = KVCompose(budget=12, window=4)
    cache = prompt_only(model, ids, policy)
    counts = [int(c[0, 0]) for c in policy.allocate(cache.layers)]
    assert 4 in counts and sum(counts) == 4 * 12  # no floor of one composite token per layer


def test_informative_layers_keep_more_and_the_total_is_the_uniform_budget():
    model, ids = model_with_different_layers(), token_ids(48, seed=2)
    cache = prompt_only(model, ids, KVCompose(budget=12, window=4))
    cache.end_prefill()
    sizes = [int(layer.valid[0, 0].sum()) for layer in cache.layers]
    assert len(set(sizes)) > 1, sizes
    assert sum(sizes) == 4 * 12
    assert all(bool((layer.valid.sum(-1) == size).all()) for layer, size in zip(cache.layers, sizes))


def test_unstructured_heads_keep_different_counts_summing_to_the_uniform_budget():
    model, ids = model_with_different_layers(), token_ids(48, seed=2)
    cache = prompt_only(model, ids, KVCompose(budget=0.25, window=4, structured=False))
    cache.end_prefill()
    counts = torch.stack([layer.valid.sum(-1)[0] for layer in cache.layers])  # [L, Hkv]
    assert int(counts.sum()) == 4 * 2 * 12
    assert len(set(counts.flatten().tolist())) > 2


@pytest.mark.parametrize("budget", [12, 0.25])
def test_decoding_keeps_each_layer_at_its_size(budget):
    model, ids = model_with_different_layers(), token_ids(48, seed=5)
    cache = PrunedCache(KVCompose(budget=budget, window=4))
    token = ids[:, -1:]
    sizes = []
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        for _ in range(9):
            token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            sizes.append([int(layer.valid[0, 0].sum()) for layer in cache.layers])
    first = sizes[0]
    for step, layer_sizes in enumerate(sizes):
        if isinstance(budget, int):
            assert layer_sizes == first
        else:  # each layer grows by the uniform growth: floor(seen * budget) - floor(49 * budget)
            grown = math.floor((49 + step) * budget) - math.floor(48 * budget)
            assert layer_sizes == [s - (math.floor(49 * budget) - math.floor(48 * budget)) + grown for s in first]
    assert len(set(first)) > 1


@pytest.mark.parametrize("structured", [True, False])
def test_batch_of_two_equals_each_row_alone(structured):
    model = model_with_different_layers()
    rows = [token_ids(36, seed=7)[0], token_ids(29, seed=8)[0]]
    policy = KVCompose(budget=0.3, window=4, structured=structured)
    ids, mask = left_pad(rows)
    batch = prompt_only(model, ids, policy, mask)
    batch.end_prefill()
    for row, alone_ids in enumerate(rows):
        alone = prompt_only(model, alone_ids[None], policy)
        alone.end_prefill()
        for layer_batch, layer_alone in zip(batch.layers, alone.layers):
            for head in range(layer_alone.num_heads):
                assert kept(layer_batch, row, head) == kept(layer_alone, 0, head)


def test_spec_string_and_validation():
    assert parse_spec("kvcompose:budget=0.2").policy == KVCompose(budget=0.2)
    assert parse_spec("kvcompose:budget=0.2,structured=false").policy.structured is False
    assert parse_spec("kvcompose:budget=0.2,agg_task=mean").policy.agg_task == "mean"
    for field, value in (("window", 0), ("agg_head", "median"), ("agg_task", "sum"), ("structured", 1),
                         ("keep_token_lower_bound", -1)):
        with pytest.raises(ValueError, match=field):
            KVCompose(**{field: value})


def test_a_budget_under_the_window_keeps_the_newest_tokens_and_the_total():
    model, ids = model_with_different_layers(), token_ids(30, seed=9)
    cache = prompt_only(model, ids, KVCompose(budget=0.2, window=8))  # 6 slots of 30, under the window
    cache.end_prefill()
    for layer in cache.layers:
        assert all(kept(layer, 0, head) == list(range(24, 30)) for head in range(layer.num_heads))
