"""ExpectedAttention against a naive computation: pre-RoPE queries recorded where the model rotates
them, RoPE rotations built as explicit matrices from the model's own rotary embedding, float64."""

import importlib

import pytest
import torch
from policy_helpers import token_ids
from tiny_models import tiny_model

from kvpress import PrunedCache
from kvpress.policies import ExpectedAttention

FAMILY_MODULES = {"llama": "llama", "gemma3": "gemma3", "qwen3": "qwen3"}


def record_pre_rope_queries(monkeypatch, family: str) -> list:
    """Every call of the family's `apply_rotary_pos_emb` appends its query input `[B, Hq, q, D]`."""
    module = importlib.import_module(f"transformers.models.{FAMILY_MODULES[family]}.modeling_{family}")
    original = module.apply_rotary_pos_emb
    calls = []

    def spy(q, k, cos, sin, *args, **kwargs):
        calls.append(q.detach().double())
        return original(q, k, cos, sin, *args, **kwargs)

    monkeypatch.setattr(module, "apply_rotary_pos_emb", spy)
    return calls


def rotation_matrices(model, layer_idx: int, positions: torch.Tensor, dim: int) -> torch.Tensor:
    """`[len(positions), D, D]`: the map `x -> x cos + rotate_half(x) sin` the model applies at each
    position, built column by column from the model's rotary embedding."""
    rotary = model.model.rotary_emb
    layer_type = getattr(model.config, "layer_types", None)
    kwargs = {"layer_type": layer_type[layer_idx]} if layer_type and "full_attention" in str(
        model.config.rope_parameters) and "rope_type" not in model.config.rope_parameters else {}
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions[None], **kwargs)
    cos, sin = cos[0].double(), sin[0].double()  # [N, D]
    eye = torch.eye(dim, dtype=torch.float64)
    half = dim // 2
    rotated_eye = torch.cat([-eye[..., half:], eye[..., :half]], dim=-1)  # rows: rotate_half(e_i)
    # column i of the matrix is the image of e_i
    return (eye[None] * cos[:, None, :] + rotated_eye[None] * sin[:, None, :]).transpose(1, 2)


def naive_scores(model, layer_idx, queries, keys, values, seen, policy, weights):
    """Expected attention times value norm of the slots after the sinks, `[B, Hkv, P - sinks]` float64,
    from recorded queries `[B, Hq, N, D]` with row weights `[N]` (zero for sinks). As the reference
    (NVIDIA kvpress's ExpectedAttentionScorer), the first `sinks` keys are removed before the softmax."""
    keys, values = keys[:, :, policy.sinks:], values[:, :, policy.sinks:]
    mean = torch.einsum("n,bhnd->bhd", weights, queries) / weights.sum()
    centred = queries - mean[:, :, None]
    cov = torch.einsum("n,bhnd,bhne->bhde", weights, centred, centred) / weights.sum()
    rotations = rotation_matrices(model, layer_idx, torch.arange(seen, seen + policy.future), queries.shape[-1])
    rotation = rotations.mean(0)
    mean, cov = mean @ rotation.T, rotation @ cov @ rotation.T
    scale = queries.shape[-1] ** -0.5
    group = queries.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    logits = scale * torch.einsum("bhd,bhpd->bhp", mean, keys)
    logits += 0.5 * scale**2 * torch.einsum("bhpd,bhde,bhpe->bhp", keys, cov, keys)
    expected = torch.softmax(logits, dim=-1)
    expected = expected.view(expected.shape[0], -1, group, expected.shape[-1]).mean(2)
    return expected * values.norm(dim=-1)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"])
@pytest.mark.parametrize("decay", [1.0, 0.9])
@torch.no_grad()
def test_scores_equal_a_naive_gaussian_expectation_after_prefill_and_decoding(monkeypatch, family, decay):
    model = tiny_model(family, "eager", num_hidden_layers=2 if family != "gemma3" else 3)
    calls = record_pre_rope_queries(monkeypatch, family)
    policy = ExpectedAttention(budget=1.0, sinks=3, future=20, decay=decay)
    cache = PrunedCache(policy)
    ids, extra = token_ids(30, seed=4), token_ids(4, seed=5)
    model(ids, cache=cache, use_cache=True)
    for token in extra[0]:
        model(token.view(1, 1), cache=cache, use_cache=True)
    layers = len(model.model.layers)
    layer_idx = layers - 1  # a full-attention layer in every family here
    queries = torch.cat(calls[layer_idx::layers], dim=2)  # [1, Hq, 34, D]
    total = queries.shape[2]
    weights = decay ** torch.arange(total - 1, -1, -1, dtype=torch.float64)
    weights[:3] = 0.0
    layer = cache.layers[layer_idx]
    expected = naive_scores(model, layer_idx, queries, layer.keys.double(), layer.values.double(), total, policy,
                            weights)
    torch.testing.assert_close(policy.score(layer).double()[:, :, policy.sinks:], expected, rtol=2e-3, atol=1e-6)


@torch.no_grad()
def test_keeps_the_sinks_and_the_slots_it_scores_highest():
    model = tiny_model("llama", "eager")
    policy = ExpectedAttention(budget=12, sinks=2, future=16)
    full = PrunedCache(ExpectedAttention(budget=1.0, sinks=2, future=16))
    model(token_ids(40, seed=6), cache=full, use_cache=True)
    cache = PrunedCache(policy)
    model(token_ids(40, seed=6), cache=cache, use_cache=True)
    for layer, reference in zip(cache.layers, full.layers):
        scores = full.policy.score(reference)[0]  # [Hkv, 40]
        for head in range(scores.shape[0]):
            kept = sorted(layer.positions[0, head][layer.valid[0, head]].tolist())
            best = scores[head, 2:].topk(10).indices + 2
            assert kept == sorted([0, 1] + best.tolist())


@pytest.mark.parametrize("field,value", [("future", 0), ("decay", 0.0), ("decay", 1.5), ("epsilon", -1.0),
                                         ("covariance", "yes")])
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ExpectedAttention(**{field: value})
