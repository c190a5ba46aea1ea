"""Dispatch: which path runs, and the kernels composed as `PrunedLayer.attend` uses them on CUDA."""

import importlib

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import MASS_TOLERANCE, random_slots, tolerance

from kvpress.attention_path import row_weights
from kvpress.reference_attention import grouped_attention
from kvpress.triton_kernels import attention_signals, compact_slots, decode_attention, use_triton
from kvpress.triton_kernels.prefill_mass import attention_with_lse_triton, prefill_mass_triton

# the package re-exports functions named like their modules: reach the modules themselves
decode = importlib.import_module("kvpress.triton_kernels.decode_attention")
compaction = importlib.import_module("kvpress.triton_kernels.compaction")


@pytest.mark.parametrize("q_len, rows", [(1, None), (19, None), (19, 5)])
def test_attention_signals_on_triton_match_the_torch_signals(device, q_len, rows):
    batch, kv_heads, group, slots, dim = 2, 2, 3, 41, 16
    query = torch.randn(batch, kv_heads * group, q_len, dim, device=device)
    key = torch.randn(batch, kv_heads, slots, dim, device=device)
    value = torch.randn(batch, kv_heads, slots, dim, device=device)
    valid = random_slots(batch, kv_heads, slots, device, visible_tail=q_len)
    weights = row_weights(q_len, rows, 1.0, device)
    out, mass = attention_signals(query, key, value, valid, scaling=0.25, weights=weights, backend="triton")
    ref_out, ref_mass = grouped_attention(query.cpu(), key.cpu(), value.cpu(), valid.cpu(), scaling=0.25,
                                          weights=weights.cpu())
    torch.testing.assert_close(out.cpu(), ref_out, **tolerance(torch.float32))
    torch.testing.assert_close(mass.cpu(), ref_mass, **MASS_TOLERANCE)
    assert attention_signals(query, key, value, valid, scaling=0.25, want_output=False) == (None, None)


def test_cpu_tensors_take_the_reference_unless_forced(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Triton launcher ran on CPU tensors")

    monkeypatch.setattr(decode, "decode_attention_triton", refuse)
    monkeypatch.setattr(compaction, "compact_slots_triton", refuse)
    query, key = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 8, 16)
    valid = torch.ones(1, 1, 8, dtype=torch.bool)
    out, _ = decode_attention(query, key, key, valid, scaling=0.25)
    assert out.shape == (1, 1, 2, 16)
    index = torch.arange(4).expand(1, 1, 4)
    kept = compact_slots(key, key, torch.zeros(1, 1, 8, dtype=torch.long), torch.zeros(1, 1, 8), index)
    assert kept[0].shape == (1, 1, 4, 16)
    with pytest.raises(AssertionError, match="Triton launcher"):
        decode_attention(query, key, key, valid, scaling=0.25, backend="triton")


def test_backend_names_are_checked_and_env_switch_disables_auto(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        use_triton(torch.zeros(1), "cuda")
    assert not use_triton(torch.zeros(1))  # CPU
    assert use_triton(torch.zeros(1), "triton") and not use_triton(torch.zeros(1), "torch")
    monkeypatch.setenv("KVPRESS_TRITON", "0")
    assert not use_triton(torch.zeros(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA dispatch of PrunedLayer.attend needs a GPU")
def test_generate_with_kernels_matches_the_torch_path_on_cuda(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvpress import PrunedCache
    from kvpress.policies import H2O

    config = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).cuda().eval()
    ids = torch.randint(1, 97, (2, 60), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding: padded query rows and masked slots

    def generate():
        cache = PrunedCache(H2O(budget=24, window=4), config=config)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, past_key_values=cache,
                             pad_token_id=0)  # past_key_values: transformers 5.17 has no cache= yet
        return out, cache

    out, cache = generate()
    monkeypatch.setenv("KVPRESS_TRITON", "0")
    torch_out, torch_cache = generate()
    assert torch.equal(out, torch_out)
    for layer, torch_layer in zip(cache.layers, torch_cache.layers):
        assert torch.equal(layer.positions, torch_layer.positions)
        torch.testing.assert_close(layer.scores, torch_layer.scores, atol=1e-4, rtol=1e-4)


def test_auto_falls_back_to_the_reference_on_mixed_dtypes_and_triton_names_them(monkeypatch):
    common = importlib.import_module("kvpress.triton_kernels._common")
    monkeypatch.setattr(common, "use_triton", lambda tensor, backend="auto": backend != "torch")  # as on CUDA
    batch, kv_heads, group, slots, dim = 1, 2, 2, 24, 16
    query = torch.randn(batch, kv_heads * group, 5, dim, dtype=torch.bfloat16)
    key = torch.randn(batch, kv_heads, slots, dim, dtype=torch.float16)  # a cache kept in another dtype
    value = torch.randn(batch, kv_heads, slots, dim, dtype=torch.float16)
    valid = random_slots(batch, kv_heads, slots, "cpu", visible_tail=5)
    weights = torch.ones(5)
    for q in (query, query[:, :, -1:]):  # prefill and decode
        out, mass = attention_signals(q, key, value, valid, scaling=0.25, weights=weights[:q.shape[2]])
        ref_out, ref_mass = grouped_attention(q, key, value, valid, scaling=0.25, weights=weights[:q.shape[2]])
        torch.testing.assert_close(out.float(), ref_out.float(), **tolerance(torch.bfloat16))
        torch.testing.assert_close(mass, ref_mass, **MASS_TOLERANCE)
        with pytest.raises(ValueError, match=r"key.dtype \(torch.float16\) must equal query.dtype"):
            attention_signals(q, key, value, valid, scaling=0.25, weights=weights[:q.shape[2]], backend="triton")
    with pytest.raises(ValueError, match=r"query head dim must be in \[1, 128\] for the Triton kernels in torch.float32"):
        decode_attention(torch.randn(1, 2, 1, 256), torch.randn(1, 1, 4, 256), torch.randn(1, 1, 4, 256),
                         torch.ones(1, 1, 4, dtype=torch.bool), scaling=0.1, backend="triton")
    big = torch.randn(1, 2, 1, 320, dtype=torch.bfloat16)
    out, _ = decode_attention(big, big[:, :1].expand(1, 1, 4, 320), big[:, :1].expand(1, 1, 4, 320),
                              torch.ones(1, 1, 4, dtype=torch.bool), scaling=0.1)  # auto: the reference
    assert out.shape == (1, 1, 2, 320)


def test_prefill_launchers_name_bad_arguments():
    query, key = torch.randn(1, 2, 9, 16), torch.randn(1, 1, 8, 16)
    valid = torch.ones(1, 1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"q must be in \[1, S=8\]"):
        attention_with_lse_triton(query, key, key, valid, scaling=0.25)
    with pytest.raises(ValueError, match="query heads \\(2\\) must be a positive multiple of KV heads \\(3\\)"):
        attention_with_lse_triton(query[:, :, :4], key.expand(1, 3, 8, 16), key.expand(1, 3, 8, 16),
                                  valid.expand(1, 3, 8), scaling=0.25)
    with pytest.raises(ValueError, match=r"weights must be \[q=4\]"):
        prefill_mass_triton(query[:, :, :4], key, valid, scaling=0.25, weights=torch.ones(3))
    with pytest.raises(ValueError, match="query_valid must be bool"):
        attention_with_lse_triton(query[:, :, :4], key, key, valid, scaling=0.25, query_valid=torch.ones(1, 4))
