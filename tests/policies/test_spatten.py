import itertools
import math
from fractions import Fraction

import torch
from policy_helpers import eager_reference, kept_positions, prefill, tiny_model, token_ids

from kvpress import PrunedCache
from kvpress.policies import SpAtten


def head_output_magnitude(attention, values, kv_heads):
    """`sum_{t,d} |O[h, t, d]|` per query head from the full matrix, summed over each KV group: `[B, Hkv]`."""
    batch, heads = attention.shape[:2]
    group = heads // kv_heads
    out = torch.einsum("bhts,bhsd->bhtd", attention, values.repeat_interleave(group, dim=1))
    return out.abs().sum(dim=(2, 3)).view(batch, kv_heads, group).sum(-1)


def test_token_scores_accumulate_over_heads_layers_and_steps():
    model, ids, extra = tiny_model(layers=3), token_ids(20), token_ids(3, seed=2)
    policy = SpAtten(budget=1.0, window=0, head_keep=1.0)
    cache = prefill(model, ids, policy, extra)
    reference = eager_reference(model, torch.cat([ids, extra], 1))
    # every query row of every step adds its attention, in every layer and head
    expected = sum(att.sum(dim=(1, 2)) for att, _, _ in reference)[0]  # [T]
    state = cache.layers[0].shared_state(policy)
    torch.testing.assert_close(state.tokens[0, :23].double(), expected, rtol=1e-4, atol=1e-4)
    heads = sum(head_output_magnitude(att, values, 2) for att, _, values in reference)
    torch.testing.assert_close(state.heads.double(), heads, rtol=1e-4, atol=1e-3)


def test_cascade_upper_layers_keep_a_subset_of_lower_layers():
    model, ids = tiny_model(layers=4), token_ids(40)
    cache = prefill(model, ids, SpAtten(budget=0.4, window=2, token_beta=3.0), extra=token_ids(6, seed=3))
    held = [set(layer.positions[0, 0][layer.valid[0, 0]].tolist()) for layer in cache.layers]
    for lower, upper in itertools.pairwise(held):
        assert upper <= lower
    counts = [len(h) for h in held]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    for layer in cache.layers:  # token pruning: every KV head keeps the same tokens
        assert torch.equal(layer.positions[0, 0][layer.valid[0, 0]], layer.positions[0, 1][layer.valid[0, 1]])


def test_prunes_the_least_important_head_from_its_layer_on():
    model, ids = tiny_model(layers=4, heads=4, kv_heads=2), token_ids(24)
    policy = SpAtten(budget=1.0, window=0, head_keep=0.5)
    cache = prefill(model, ids, policy)
    # layers 0-2 keep both heads; layer 3 keeps one: the larger output magnitude over layers 0-3
    assert [policy.heads_kept(2, index, 4) for index in range(4)] == [2, 2, 2, 1]
    reference = eager_reference(model, ids)
    importance = sum(head_output_magnitude(att, values, 2) for att, _, values in reference)[0]
    weakest = int(importance.argmin())
    for index, layer in enumerate(cache.layers):
        stored = layer.valid[0].any(-1).tolist()
        assert stored == ([True, True] if index < 3 else [h != weakest for h in range(2)])


def test_pruned_heads_are_no_longer_stored_or_attended_and_the_model_generates():
    model, ids = tiny_model(layers=4, heads=4, kv_heads=2), token_ids(30)
    policy = SpAtten(budget=0.5, window=2, head_keep=0.5)
    outputs = []
    hook = model.model.layers[3].self_attn.o_proj.register_forward_pre_hook(
        lambda module, args: outputs.append(args[0].detach().clone()))
    cache = PrunedCache(policy)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, cache=cache)
    hook.remove()
    assert out.shape == (1, 36)
    layer = cache.layers[3]
    dropped = ~layer.valid[0].any(-1)  # [Hkv]
    assert int(dropped.sum()) == 1
    head = int(dropped.nonzero()[0])
    assert layer.slots.heads_off[0].tolist() == dropped.tolist()
    for step in outputs[1:]:  # decoding steps: the pruned KV head's query heads output zeros
        per_head = step.view(1, 1, 4, 16)
        assert per_head[0, 0, 2 * head: 2 * head + 2].abs().max() == 0
        assert per_head[0, 0, 2 * (1 - head): 2 * (1 - head) + 2].abs().max() > 0


def test_state_is_per_cache():
    model, ids = tiny_model(), token_ids(20)
    policy = SpAtten(budget=0.5, window=2)
    first = prefill(model, ids, policy)
    second = prefill(model, ids, policy)
    first_state, second_state = first.layers[0].shared_state(policy), second.layers[0].shared_state(policy)
    assert first_state is not second_state
    torch.testing.assert_close(first_state.tokens, second_state.tokens)


def naive_layer_counts(mean: int, window: int, layers: int, beta: Fraction) -> list[int]:
    """The linear token schedule written out: layer `l` keeps `hi - l (hi - lo) / (L - 1)` tokens outside the
    window, `lo = (mean - window) / beta`, `hi = 2 (mean - window) - lo`; integer counts are the differences
    of the floored cumulative sums, so they add up to `L * mean` exactly."""
    outside = Fraction(mean - window)
    lo = outside / beta
    hi = 2 * outside - lo
    cumulative = [math.floor(sum(hi - j * (hi - lo) / (layers - 1) for j in range(i))) for i in range(layers + 1)]
    return [cumulative[i + 1] - cumulative[i] + window for i in range(layers)]


def test_default_prunes_no_kv_head_and_gives_every_layer_the_same_budget():
    """The default follows the authors' LLM release (mit-han-lab/spatten-llm): token pruning only, the
    same budget in every layer. A KV head of a GQA model is several of the paper's heads (docs/policies.md)."""
    model, ids = tiny_model(layers=4, heads=4, kv_heads=2), token_ids(60)
    policy = SpAtten(budget=0.5, window=2)
    assert (policy.head_keep, policy.token_beta) == (1.0, 1.0)
    cache = prefill(model, ids, policy, extra=token_ids(4, seed=3))
    for layer in cache.layers:
        assert layer.heads_off is None or not bool(layer.heads_off.any())
        assert layer.valid[0].sum(-1).tolist() == [32, 32]  # 30 of the prompt's 60 plus one per step, 2 heads


def test_cascade_keeps_the_top_of_the_cumulative_score_among_the_tokens_held_below():
    """Expected: the cascade computed from the full eager attention, layer by layer, with the linear token
    schedule written out (token_beta=5/3: the last layer keeps 0.6 of the mean outside the window)."""
    model, ids = tiny_model(layers=4, heads=4, kv_heads=2), token_ids(60)
    cache = prefill(model, ids, SpAtten(budget=0.5, window=2, token_beta=5 / 3))
    counts = naive_layer_counts(30, 2, 4, Fraction(5, 3))
    assert counts == [41, 33, 27, 19]
    score, held, window = torch.zeros(60, dtype=torch.float64), set(range(60)), {58, 59}
    for layer, (attention, _, _), count in zip(cache.layers, eager_reference(model, ids), counts):
        score += attention[0].sum(dim=(0, 1))  # every head and every prompt row, this layer and below
        candidates = sorted(held - window, key=lambda t: -float(score[t]))
        held = window | set(candidates[:count - len(window)])
        for head in range(2):  # every KV head stores the same tokens: the cascade's
            assert set(kept_positions(layer, head=head)) == held
