"""Each policy's scores equal a naive computation from the full eager attention matrix."""

import torch
import torch.nn.functional as F
from tiny_models import random_ids, tiny_model
from transformers import DynamicCache

from kvpress import PrunedCache
from kvpress.policies import H2O, TOVA, Knorm, SnapKV

GROUP = 2  # 4 query heads over 2 KV heads in the tiny models


def full_attention(model, ids):
    """Per layer `[B, Hq, T, T]` probabilities from transformers' own eager attention."""
    with torch.no_grad():
        out = model(ids, cache=DynamicCache(), output_attentions=True)
    return out.attentions


def per_kv_head(probs):  # [B, Hq, ...] -> [B, Hkv, ...] summed over each group
    b, hq = probs.shape[:2]
    return probs.reshape(b, hq // GROUP, GROUP, *probs.shape[2:]).sum(2)


def test_h2o_scores_are_column_sums_over_prefill_and_decode_rows():
    model = tiny_model("llama", "eager")
    ids = random_ids(1, 24)
    cache = PrunedCache(H2O(budget=1.0, window=0))
    out = model.generate(ids, cache=cache, max_new_tokens=5, do_sample=False, pad_token_id=0)
    # the cache has seen the prompt and 4 generated tokens (the 5th is never fed back)
    attentions = full_attention(model, out[:, :-1])
    for layer, probs in zip(cache.layers, attentions):
        expected = per_kv_head(probs).sum(2)  # [B, Hkv, T]: every query row, every group head
        assert torch.allclose(layer.scores, expected, atol=1e-4)


def test_snapkv_scores_are_pooled_window_rows():
    model = tiny_model("llama", "eager")
    ids = random_ids(1, 30)
    policy = SnapKV(budget=1.0, window=6, kernel=5, pooling="max")
    cache = PrunedCache(policy)
    with torch.no_grad():
        model(ids, cache=cache)
    for layer, probs in zip(cache.layers, full_attention(model, ids)):
        window_mass = per_kv_head(probs[:, :, -6:]).sum(2)  # [B, Hkv, T]
        assert torch.allclose(layer.scores, window_mass, atol=1e-5)
        pooled = F.max_pool1d(window_mass, 5, stride=1, padding=2)
        assert torch.allclose(policy.score(layer), pooled, atol=1e-5)


def test_tova_scores_are_the_last_row_over_all_heads():
    model = tiny_model("llama", "eager")
    ids = random_ids(1, 30)
    policy = TOVA(budget=1.0)
    cache = PrunedCache(policy)
    with torch.no_grad():
        model(ids, cache=cache)
    for layer, probs in zip(cache.layers, full_attention(model, ids)):
        last = probs[:, :, -1].sum(1)  # [B, T] over all query heads
        assert torch.allclose(policy.score(layer), last[:, None].expand(-1, 2, -1), atol=1e-5)


def test_knorm_scores_are_negative_key_norms():
    model = tiny_model("llama", "eager")
    ids = random_ids(1, 30)
    policy = Knorm(budget=1.0)
    cache, full = PrunedCache(policy), DynamicCache()
    with torch.no_grad():
        model(ids, cache=cache)
        model(ids, cache=full)
    for layer, ref in zip(cache.layers, full.layers):
        assert torch.allclose(policy.score(layer), -ref.keys.norm(dim=-1), atol=1e-5)


def test_h2o_keeps_the_top_scoring_slots_outside_the_window():
    model = tiny_model("llama", "eager")
    ids = random_ids(1, 40)
    cache = PrunedCache(H2O(budget=16, window=4))
    with torch.no_grad():
        model(ids, cache=cache)
    for layer, probs in zip(cache.layers, full_attention(model, ids)):
        column_sums = per_kv_head(probs).sum(2)[0]  # [Hkv, T]
        for head in range(2):
            candidates = column_sums[head, :36]
            expected = set(candidates.topk(12).indices.tolist()) | set(range(36, 40))
            assert set(layer.positions[0, head].tolist()) == expected
