"""Triton KIVI kernels (triton_kernels/quantization.py) against their PyTorch references, and the
references against plain arithmetic. Tiny grids: the interpreter costs ~3 ms per program."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from kvpress.kivi import pack
from kvpress.triton_kernels import quantization as qk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not qk.HAS_TRITON, reason="triton not installed")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_values_kernel_matches_reference(bits):
    x = torch.randn(20, 32, device=DEVICE) * 2
    packed, scale, zero = qk.quantize_values_triton(x, bits, 8)
    ref_packed, ref_scale, ref_zero = qk.quantize_values_reference(x, bits, 8)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)
    assert torch.equal(packed, ref_packed)
    # and the reference is what the formula says: codes round((x - min) / s), packed low bits first
    groups = x.reshape(20, 4, 8)
    low, step = groups.amin(-1, keepdim=True), (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / (2**bits - 1)
    codes = torch.round((groups - low) / step).clamp(0, 2**bits - 1).to(torch.uint8).reshape(20, 32)
    assert torch.equal(pack(codes, bits), ref_packed)


@pytest.mark.parametrize("bits, dtype", [(2, torch.float32), (4, torch.float32), (4, torch.bfloat16),
                                         (2, torch.float16)])
def test_quantize_keys_kernel_matches_reference(bits, dtype):
    # bf16 scales round to nearest even, exactly as torch's cast (the interpreter's own cast truncates)
    x = torch.randn(3, 16, 32, device=DEVICE).to(dtype) * 3
    x[:, :, 7] *= 30  # outlier channel
    got = qk.quantize_keys_triton(x, bits)
    ref = qk.quantize_keys_reference(x, bits)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantize_kernels_match_reference(bits):
    x = torch.randn(24, 32, device=DEVICE)
    packed, scale, zero = qk.quantize_values_reference(x, bits, 8)
    assert torch.allclose(qk.dequantize_values_triton(packed, scale, zero, bits),
                          qk.dequantize_values_reference(packed, scale, zero, bits), atol=1e-6)
    kpacked, kscale, kzero = qk.quantize_keys_reference(x.reshape(3, 8, 32), bits)
    block = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2], device=DEVICE)  # 8 slots kept out of 24, 3 blocks
    rows = kpacked.reshape(24, -1)[torch.tensor([0, 5, 9, 12, 15, 17, 20, 23], device=DEVICE)]
    got = qk.dequantize_keys_triton(rows, kscale, kzero, block, bits)
    want = qk.dequantize_keys_reference(rows, kscale, kzero, block, bits)
    assert torch.allclose(got, want, atol=1e-6)


def _quantized_layer(batch=2, heads=2, slots=24, residual=5, dim=32, bits=4, group=8):
    from kvpress.quant_config import KVQuant
    from kvpress.quantized import QuantizedStore
    keys = torch.randn(batch, heads, slots + residual, dim, device=DEVICE)
    values = torch.randn(batch, heads, slots + residual, dim, device=DEVICE)
    store = QuantizedStore(KVQuant(bits, group, residual), keys, values)
    # thin blocks out per head, as an eviction would
    index = torch.stack([torch.stack([torch.cat([torch.arange(0, 20, 2), torch.arange(24, 29)]),
                                      torch.cat([torch.arange(3, 13), torch.arange(24, 29)])])] * batch).to(DEVICE)
    store.keep(index, quantized=10)
    return store, keys


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_decode_attention_matches_reference_and_dequantized_attention(bits):
    from kvpress.kivi import block_of_slot
    store, _ = _quantized_layer(bits=bits)
    batch, heads, n, dim = 2, 2, store.quantized_slots, 32
    query = torch.randn(batch, 4, dim, device=DEVICE)
    valid = torch.ones(batch, heads, store.num_slots, dtype=torch.bool, device=DEVICE)
    valid[1, 0, 3] = False
    valid[0, 1, -1] = False
    args = (query, store.key_codes, store.key_scale, store.key_zero, block_of_slot(store.key_counts, n),
            store.value_codes, store.value_scale, store.value_zero, store.residual_keys, store.residual_values, valid)
    got = qk.quantized_decode_attention_triton(*args, scaling=dim ** -0.5, bits=bits)
    want = qk.quantized_decode_attention_reference(*args, scaling=dim ** -0.5, bits=bits)
    assert torch.allclose(got, want, atol=1e-5)
    # independent check: plain softmax attention over the store's dequantized slots
    k, v = store.dequantize()
    k, v = torch.cat([k, store.residual_keys], 2), torch.cat([v, store.residual_values], 2)
    out = torch.empty_like(got)
    for b in range(batch):
        for h in range(4):
            kv = h // 2
            logits = (k[b, kv] @ query[b, h]) * dim ** -0.5
            logits[~valid[b, kv]] = float("-inf")
            out[b, h] = torch.softmax(logits, 0) @ v[b, kv]
    assert torch.allclose(got, out, atol=1e-5)
    # the logits and log-sum-exp the cache turns into the attention mass
    got_out, logits, lse = qk.quantized_decode_attention_triton(*args, scaling=dim ** -0.5, bits=bits, return_logits=True)
    _, want_logits, want_lse = qk.quantized_decode_attention_reference(*args, scaling=dim ** -0.5, bits=bits,
                                                                       return_logits=True)
    assert torch.equal(got_out, got)
    assert torch.allclose(logits, want_logits, atol=1e-5) and torch.allclose(lse, want_lse, atol=1e-5)
    for b in range(batch):
        for h in range(4):
            expected = (k[b, h // 2] @ query[b, h]) * dim ** -0.5
            assert torch.allclose(logits[b, h][valid[b, h // 2]], expected[valid[b, h // 2]], atol=1e-5)
            assert bool(torch.isinf(logits[b, h][~valid[b, h // 2]]).all())
            assert torch.allclose(lse[b, h], torch.logsumexp(expected[valid[b, h // 2]], 0), atol=1e-5)


def test_quantize_rounds_exact_ties_to_even_like_torch_round():
    # group of 8: min 0, max 3 -> 2-bit scale exactly 1, so 0.5, 1.5, 2.5 are exact ties
    x = torch.tensor([[0.0, 0.5, 1.5, 2.5, 3.0, 1.0, 2.0, 0.25]] * 4, device=DEVICE)
    packed, scale, zero = qk.quantize_values_triton(x, 2, 8)
    ref_packed, ref_scale, ref_zero = qk.quantize_values_reference(x, 2, 8)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)
    assert torch.equal(packed, ref_packed)
    codes = torch.tensor([[0, 0, 2, 2, 3, 1, 2, 0]] * 4, device=DEVICE)  # ties to even, as torch.round
    assert torch.equal(packed, pack(codes, 2))
    keys = qk.quantize_keys_triton(x.T.reshape(1, 8, 4).contiguous(), 2)
    for a, b in zip(keys, qk.quantize_keys_reference(x.T.reshape(1, 8, 4).contiguous(), 2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_reference_scale_is_the_correctly_rounded_quotient_the_kernels_compute(bits):
    # (max - min) / levels rounded once, as the kernels' div_rn: ATen on CUDA turns a division by a
    # Python number into a multiplication by 1 / levels, which differs in the last bit for about half
    # of these ranges, so the reference divides by a tensor (on a GPU this test runs compiled there)
    import numpy as np

    levels = (1 << bits) - 1
    x = torch.rand(64, 32, generator=torch.Generator().manual_seed(bits)) * 8
    groups = x.reshape(64, 4, 8).numpy()
    quotient = (groups.max(-1) - groups.min(-1)) / np.float32(levels)  # fp32, IEEE division
    by_reciprocal = (groups.max(-1) - groups.min(-1)) * (np.float32(1) / np.float32(levels))
    assert (quotient != by_reciprocal).any()  # the data tells the two roundings apart
    x = x.to(DEVICE)
    _, ref_scale, _ = qk.quantize_values_reference(x, bits, 8)
    assert torch.equal(ref_scale.cpu(), torch.from_numpy(quotient))
    packed, scale, zero = qk.quantize_values_triton(x, bits, 8)
    ref_packed, _, ref_zero = qk.quantize_values_reference(x, bits, 8)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero) and torch.equal(packed, ref_packed)
