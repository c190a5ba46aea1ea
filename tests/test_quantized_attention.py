"""Attention over KIVI-quantized storage (`kvpress.reference_attention.quantized_attention`): blocks of
dequantized slots instead of the whole layer, and the quantized decode kernel on CUDA (run here in Triton's
interpreter).

The reference is a naive loop: softmax attention, row by row and head by head, over the store's
dequantized keys and values (`QuantizedStore.dequantize`, the KIVI formula tested in test_quant.py).
"""

import pytest
import torch
from registry_policies import make_policy
from tiny_models import random_ids, tiny_model

from kvpress import KVQuant, PrunedCache, reference_attention
from kvpress.quantized import QuantizedStore
from kvpress.reference_attention import quantized_attention
from kvpress.triton_kernels import HAS_TRITON


def quantized_layer(batch=2, heads=2, slots=70, dim=16, residual=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(batch, heads, slots, dim, generator=gen), torch.randn(batch, heads, slots, dim, generator=gen)
    store = QuantizedStore(KVQuant(bits=4, group_size=8, residual=residual), keys, values)
    # thin blocks out differently per head, as evictions do
    index = torch.stack([torch.arange(0, slots, 2), torch.arange(1, slots, 2)])[None].expand(batch, -1, -1)
    store.keep(index.contiguous(), quantized=32)  # half of the 64 quantized slots, half of the residual
    return store


def naive(query, store, valid, scaling, query_valid=None, weights=None):
    """Loop over rows and heads: query row i sees valid slots up to S - q + i."""
    keys, values = store.dequantize()
    keys = torch.cat([keys, store.residual_keys], 2).float()
    values = torch.cat([values, store.residual_values], 2).float()
    batch, q_heads, q_len, _ = query.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    out = torch.zeros(batch, q_len, q_heads, values.shape[-1])
    mass = torch.zeros(batch, kv_heads, slots)
    for b in range(batch):
        for h in range(q_heads):
            kv = h // group
            for i in range(q_len):
                if query_valid is not None and not query_valid[b, i]:
                    continue
                seen = valid[b, kv].clone()
                seen[slots - q_len + i + 1:] = False
                logits = keys[b, kv] @ query[b, h, i].float() * scaling
                probs = torch.softmax(logits.masked_fill(~seen, float("-inf")), 0)
                out[b, i, h] = probs @ values[b, kv]
                if weights is not None:
                    mass[b, kv] += weights[i] * probs
    return out, mass


@pytest.mark.parametrize("q_len", [1, 9])
@pytest.mark.parametrize("block_elements", [1 << 18, 16 * 2 * 2 * 16])  # one block / blocks of 16 slots
def test_blockwise_attention_over_quantized_slots_matches_naive_attention(q_len, block_elements):
    store = quantized_layer()
    store.append(torch.randn(2, 2, q_len, 16), torch.randn(2, 2, q_len, 16))  # this forward's tokens
    slots = store.num_slots
    assert store.quantized_slots > 16  # several key blocks, thinned out
    valid = torch.rand(2, 2, slots, generator=torch.Generator().manual_seed(1)) < 0.8
    valid[..., -q_len:] = True
    query = torch.randn(2, 4, q_len, 16)
    query_valid = torch.ones(2, q_len, dtype=torch.bool)
    if q_len > 1:
        query_valid[1, :3] = False  # padding rows: zero output, no mass
    weights = torch.linspace(0.5, 1.0, q_len)
    out, mass = quantized_attention(query, store, valid, scaling=0.25, query_valid=query_valid if q_len > 1 else None,
                                    weights=weights, block_elements=block_elements)
    want_out, want_mass = naive(query, store, valid, 0.25, query_valid if q_len > 1 else None, weights)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass, want_mass, rtol=1e-5, atol=1e-5)


def test_a_forward_never_dequantizes_the_whole_layer(monkeypatch):
    """Attention reads blocks; nothing dequantizes the whole quantized region for a policy that scores
    with attention (H2O), at prefill continuation or decoding, and no block exceeds its bound."""
    model = tiny_model("llama", "eager")
    blocks = []
    original = QuantizedStore._block

    def recorded(self, start, stop, keys):
        blocks.append(stop - start)
        return original(self, start, stop, keys)

    def whole(self):
        raise AssertionError("the whole quantized region was dequantized")

    monkeypatch.setattr(QuantizedStore, "_block", recorded)
    monkeypatch.setattr(QuantizedStore, "dequantize", whole)
    # 16 slots of [B=2, Hkv=2, D=16]
    monkeypatch.setattr(reference_attention, "QUANTIZED_BLOCK_ELEMENTS", 2 * 2 * 16 * 16)
    cache = PrunedCache(make_policy("h2o", 40), quantization=KVQuant(bits=4, group_size=8, residual=8))
    ids = random_ids(2, 60, seed=2)
    with torch.no_grad():
        logits = model(ids, cache=cache).logits
        model(random_ids(2, 5, seed=3), cache=cache)  # a second multi-token forward (a chat turn)
        for _ in range(6):
            logits = model(logits[:, -1:].argmax(-1), cache=cache).logits
    assert cache.layers[0].store.quantized_slots >= 16
    assert blocks and max(blocks) <= 16


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("name", ["h2o", "tova", "knorm"])  # adds mass, replaces it, needs none
def test_quantized_decode_kernel_is_what_the_cache_uses(name, monkeypatch):
    """The decoding step of a quantized layer runs the quantized decode kernel (Triton's interpreter
    here); its tokens and running scores equal the blockwise PyTorch path's."""
    from kvpress.triton_kernels import quantization

    model = tiny_model("llama", "eager")
    ids = random_ids(1, 40, seed=4)
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    quant = KVQuant(bits=4, group_size=8, residual=4)
    plain = PrunedCache(make_policy(name, 24), quantization=quant)
    reference = model.generate(ids, cache=plain, **settings)
    calls = []
    launcher = quantization.quantized_decode_attention_triton
    monkeypatch.setattr(reference_attention, "QUANTIZED_DECODE_BACKEND", "triton")
    monkeypatch.setattr(reference_attention, "quantized_decode_attention_triton",
                        lambda *args, **kwargs: calls.append(1) or launcher(*args, **kwargs))
    fused = PrunedCache(make_policy(name, 24), quantization=quant)
    assert torch.equal(model.generate(ids, cache=fused, **settings), reference)
    assert len(calls) == 4 * len(fused.layers)  # every decoding step of every layer
    for a, b in zip(plain.layers, fused.layers):
        if a.scores is not None:
            torch.testing.assert_close(a.scores[a.valid], b.scores[b.valid], rtol=1e-4, atol=1e-5)
