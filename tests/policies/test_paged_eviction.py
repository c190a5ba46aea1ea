"""PagedEviction: no attention signal, the prompt's first and newest blocks kept with the tokens at the
reference's end of the score, whole blocks evicted while decoding (never the first nor the newest),
token and block scores against a naive computation written from the reference code
(`krishnateja95/PagedEviction` `modeling_llama.py`: norms averaged over heads before the score, page
scores per variant, the global variant keeping the low end), the budget at every step, blocks in the
report."""

import pytest
import torch
from policy_helpers import eager_reference, tiny_model, token_ids
from tiny_models import left_pad

import kvpress.attention_path
from kvpress import PrunedCache
from kvpress.policies import PagedEviction
from kvpress.policy import DECODE, PREFILL
from kvpress.spec import parse_spec


def naive_norms(keys: torch.Tensor, values: torch.Tensor, slot: int) -> tuple[float, float]:
    """The key and value L2 norms of `slot`, averaged over the KV heads (the reference's
    `torch.norm(x, dim=-1).mean(dim=[0, 1])`, one batch row)."""
    heads = keys.shape[0]
    k = sum(float(keys[head, slot].double().norm()) for head in range(heads)) / heads
    v = sum(float(values[head, slot].double().norm()) for head in range(heads)) / heads
    return k, v


def naive_formula(k: float, v: float, kind: str) -> float:
    return {"v_over_k": v / (k + 1e-6), "inverse_key": 1 / (k + 1e-6), "value": v, "key_plus_value": k + v}[kind]


def naive_token_scores(keys: torch.Tensor, values: torch.Tensor, kind: str) -> list[float]:
    """`keys`, `values [Hkv, T, D]` of one row -> each slot's score from its head-averaged norms (the
    reference's `get_token_score`: norms averaged first, then inverted or added)."""
    return [naive_formula(*naive_norms(keys, values, slot), kind) for slot in range(keys.shape[1])]


def naive_block_score(keys, values, slots: list[int], kind: str, local: bool) -> float:
    """The reference's page score over `slots`: global variant (`get_page_score`) the formula on the
    norms averaged over heads and tokens; local variant the tokens' scores summed (here: averaged,
    every compared block is full)."""
    if local:
        tokens = naive_token_scores(keys, values, kind)
        return sum(tokens[s] for s in slots) / len(slots)
    norms = [naive_norms(keys, values, s) for s in slots]
    return naive_formula(sum(k for k, _ in norms) / len(norms), sum(v for _, v in norms) / len(norms), kind)


def reference_keeps_low(kind: str, local: bool) -> bool:
    """The reference keeps the low end in its global variant (`topk(largest=False)` at prefill, the
    page with the largest score evicted), the high end in its local one; `v_over_k`, which the
    reference code lacks, keeps the high end (the paper evicts the least important tokens)."""
    return not local and kind != "v_over_k"


def held(layer, row: int = 0) -> list[int]:
    """Positions the row holds, in slot (temporal) order; every head must hold the same ones."""
    positions = [layer.positions[row, head][layer.valid[row, head]].tolist() for head in range(layer.num_heads)]
    assert all(p == positions[0] for p in positions)
    return positions[0]


@torch.no_grad()
def step(model, cache, token: int) -> None:
    model(torch.tensor([[token]]), cache=cache, use_cache=True)


@torch.no_grad()
def prompt_then_steps(model, ids, policy, tokens, after_step=None) -> PrunedCache:
    """The prompt, then `tokens` one decoding step each; `after_step(cache)` after every step."""
    cache = PrunedCache(policy)
    model(ids, cache=cache, use_cache=True)
    for token in tokens:
        step(model, cache, token)
        if after_step is not None:
            after_step(cache)
    return cache


def test_no_attention_signal_is_requested_or_computed(monkeypatch):
    policy = PagedEviction(budget=12, block_size=4)
    assert policy.request(PREFILL) is None and policy.request(DECODE) is None
    calls = []
    original = kvpress.attention_path.grouped_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("weights") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(kvpress.attention_path, "grouped_attention", counting)
    model = tiny_model()
    ids, mask = left_pad([token_ids(30, seed=1)[0], token_ids(22, seed=2)[0]])  # padding: the library's path
    cache = PrunedCache(policy)
    model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert calls and not any(calls)  # attention ran through the library, never with a signal
    for layer in cache.layers:
        assert layer.scores is None and sum(state.nbytes for state in layer.states.values()) == 0


@pytest.mark.parametrize("oldest_blocks", [None, 2])
@pytest.mark.parametrize("kind", ["v_over_k", "inverse_key", "value", "key_plus_value"])
def test_prompt_keeps_first_and_newest_block_and_the_reference_end_of_the_tokens(kind, oldest_blocks):
    model, ids = tiny_model(), token_ids(38, seed=3)
    budget, block = 20, 4
    cache = PrunedCache(PagedEviction(budget=budget, block_size=block, token_score=kind, oldest_blocks=oldest_blocks))
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    sign = 1 if reference_keeps_low(kind, oldest_blocks is not None) else -1
    for layer, (_, keys, values) in zip(cache.layers, eager_reference(model, ids)):
        scores = naive_token_scores(keys[0], values[0], kind)
        reserved = list(range(block)) + list(range(36, 38))  # 38 = 9 full blocks + a newest block of 2
        rest = sorted((j for j in range(38) if j not in reserved), key=lambda j: (sign * scores[j], -j))
        assert held(layer) == sorted(reserved + rest[:budget - len(reserved)])


@pytest.mark.parametrize(("keep_end", "low"), [("high", False), ("low", True)])
def test_keep_end_keeps_that_end_in_both_variants(keep_end, low):
    model, ids = tiny_model(), token_ids(38, seed=3)
    for oldest_blocks in (None, 2):
        cache = PrunedCache(PagedEviction(budget=20, block_size=4, token_score="inverse_key",
                                          oldest_blocks=oldest_blocks, keep_end=keep_end))
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True)
        for layer, (_, keys, values) in zip(cache.layers, eager_reference(model, ids)):
            scores = naive_token_scores(keys[0], values[0], "inverse_key")
            rest = sorted(range(4, 36), key=lambda j: ((1 if low else -1) * scores[j], -j))
            assert held(layer) == sorted(list(range(4)) + rest[:14] + [36, 37])


@pytest.mark.parametrize("oldest_blocks", [None, 2])
@pytest.mark.parametrize("kind", ["v_over_k", "inverse_key"])
def test_block_scores_equal_the_reference_page_score(kind, oldest_blocks):
    model, ids = tiny_model(), token_ids(30, seed=4)
    policy = PagedEviction(budget=20, block_size=4, token_score=kind, oldest_blocks=oldest_blocks)
    cache = prompt_then_steps(model, ids, policy, (5, 6, 7))
    for layer in cache.layers:
        slots = [s for s in range(layer.num_slots) if bool(layer.valid[0, 0, s])]
        expected = {}
        for rank, slot in enumerate(slots):
            members = slots[rank // 4 * 4:rank // 4 * 4 + 4]
            expected[slot] = naive_block_score(layer.keys[0], layer.values[0], members, kind, oldest_blocks is not None)
        ours = policy.block_scores(layer)[0]
        torch.testing.assert_close(ours[slots].double(), torch.tensor([expected[s] for s in slots]).double(),
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["v_over_k", "inverse_key"])
@pytest.mark.parametrize("oldest_blocks", [None, 2])
def test_decoding_evicts_the_reference_whole_block_and_the_budget_holds(oldest_blocks, kind):
    model, ids = tiny_model(), token_ids(50, seed=5)
    budget, block = 24, 4
    local = oldest_blocks is not None
    sign = 1 if reference_keeps_low(kind, local) else -1  # the evicted block is the first by (-sign * score)
    policy = PagedEviction(budget=budget, block_size=block, oldest_blocks=oldest_blocks, token_score=kind)
    cache = PrunedCache(policy)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    evictions = 0
    for index, token in enumerate(token_ids(20, seed=6)[0].tolist()):
        before = {layer.layer_idx: (held(layer), layer.keys[0][:, layer.valid[0, 0]].clone(),
                                    layer.values[0][:, layer.valid[0, 0]].clone()) for layer in cache.layers}
        step(model, cache, token)
        for layer in cache.layers:
            positions, keys, values = before[layer.layer_idx]
            after = held(layer)
            assert budget - block <= len(after) <= budget
            grown = positions + [50 + index]
            if len(after) == len(grown):
                assert after == grown
                continue
            evictions += 1
            gone = [p for p in grown if p not in after]
            assert len(gone) == block
            start = grown.index(gone[0])
            assert gone == grown[start:start + block] and start % block == 0  # one whole block
            first, newest = 0, (len(grown) - 1) // block
            candidates = [b for b in range(first + 1, newest)
                          if oldest_blocks is None or b <= oldest_blocks]
            # the new token's slot (rank len(positions)) is in the newest block, never a candidate
            score = {b: naive_block_score(keys, values, list(range(b * block, b * block + block)), kind, local)
                     for b in candidates}
            evicted = min(candidates, key=lambda b: (-sign * score[b], -b))
            assert start // block == evicted
    assert evictions == 5 * len(cache.layers)  # 24 -> 25 evicts at the 1st step, then every 4th


def test_a_budget_under_four_blocks_uses_quarter_blocks():
    model, ids = tiny_model(), token_ids(40, seed=7)
    policy = PagedEviction(budget=10, block_size=16)

    def within_budget(cache):
        assert all(8 <= len(held(layer)) <= 10 for layer in cache.layers)

    cache = prompt_then_steps(model, ids, policy, range(3, 12), within_budget)
    assert all(policy.block_size_of(layer) == 2 for layer in cache.layers)


def test_report_shows_blocks_held_and_block_size():
    model, ids = tiny_model(), token_ids(60, seed=8)
    cache = PrunedCache(PagedEviction(budget=32, block_size=8))
    model.generate(ids, cache=cache, max_new_tokens=4, do_sample=False, pad_token_id=0)
    report = cache.report()
    # 32 kept from the prompt; 3 decoding steps: 33 -> 25 (one block out), 26, 27 = 3 full blocks + 3
    assert [(row.block_size, row.blocks, row.kept) for row in report.layers] == [(8, 4, 27)] * 2
    assert "blocks" in str(report)


def test_spec_string_and_validation():
    assert parse_spec("pagedeviction:budget=0.2,block_size=16").policy == PagedEviction(budget=0.2)
    assert parse_spec("pagedeviction:budget=0.2,keep_end=high").policy.keep_end == "high"
    for field, value in (("block_size", 0), ("token_score", "attention"), ("oldest_blocks", 0), ("keep_end", "middle")):
        with pytest.raises(ValueError, match=field):
            PagedEviction(**{field: value})


def test_with_slack_several_whole_blocks_go_at_once_and_the_budget_holds_after():
    model, ids = tiny_model(), token_ids(50, seed=9)
    budget, block, slack = 24, 4, 6
    cache = PrunedCache(PagedEviction(budget=budget, block_size=block), slack=slack)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    dropped = 0
    for index, token in enumerate(token_ids(21, seed=10)[0].tolist()):
        before = [held(layer) for layer in cache.layers]
        step(model, cache, token)
        for positions, layer in zip(before, cache.layers):
            grown, after = positions + [50 + index], held(layer)
            assert len(after) <= budget + slack
            if len(after) == len(grown):
                continue
            dropped += 1
            assert len(after) <= budget
            gone = [rank for rank, p in enumerate(grown) if p not in after]
            blocks = {rank // block for rank in gone}
            assert gone == [r for b in sorted(blocks) for r in range(b * block, b * block + block)]
            assert 0 not in blocks and (len(grown) - 1) // block not in blocks
    assert dropped == 3 * len(cache.layers)  # every slack + 1 = 7 steps
