"""Fused decode attention + per-slot mass against its PyTorch reference and `kvpress.reference_attention`."""

import importlib

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import MASS_TOLERANCE, random_slots, tolerance

from kvpress.reference_attention import grouped_attention
from kvpress.triton_kernels.decode_attention import (
    decode_attention_reference,
    decode_attention_triton,
)

# the package re-exports a function named like this module: reach the module itself
decode_module = importlib.import_module("kvpress.triton_kernels.decode_attention")


def make_inputs(device, batch=2, kv_heads=2, group=3, slots=77, dim=32, value_dim=None, dtype=torch.float32):
    query = torch.randn(batch, kv_heads * group, 1, dim, device=device).to(dtype)
    key = torch.randn(batch, kv_heads, slots, dim, device=device).to(dtype)
    value = torch.randn(batch, kv_heads, slots, value_dim or dim, device=device).to(dtype)
    return query, key, value, random_slots(batch, kv_heads, slots, device)


@pytest.mark.parametrize(
    "dim, group, slots, dtype",
    [(16, 1, 77, torch.float32), (32, 3, 130, torch.float16), (64, 4, 77, torch.bfloat16),
     (32, 4, 50, torch.float32)],
)
def test_decode_matches_reference_across_head_dims_groups_and_dtypes(device, dim, group, slots, dtype):
    query, key, value, valid = make_inputs(device, group=group, slots=slots, dim=dim, dtype=dtype)
    weights = torch.tensor([0.7], device=device)
    kwargs = {"scaling": dim ** -0.5, "weights": weights}
    out, mass = decode_attention_triton(query, key, value, valid, split_size=32, **kwargs)  # several splits
    ref_out, ref_mass = decode_attention_reference(query, key, value, valid, **kwargs)
    torch.testing.assert_close(out.float(), ref_out.float(), **tolerance(dtype))
    torch.testing.assert_close(mass, ref_mass, **MASS_TOLERANCE)
    assert out.dtype == dtype and out.shape == (2, 1, 2 * group, dim)
    assert float(mass[~valid].abs().max()) == 0.0  # masked slots receive no mass


def test_decode_reference_agrees_with_library_grouped_attention(device):
    query, key, value, valid = make_inputs(device, group=4, slots=40)
    weights = torch.tensor([1.0], device=device)
    ref_out, ref_mass = decode_attention_reference(query, key, value, valid, scaling=0.2, softcap=3.0,
                                                   weights=weights)
    out, mass = grouped_attention(query.cpu(), key.cpu(), value.cpu(), valid.cpu(), scaling=0.2, softcap=3.0,
                                  weights=weights.cpu())
    torch.testing.assert_close(ref_out.cpu(), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_mass.cpu(), mass, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mass.sum(-1), torch.full_like(mass.sum(-1), 4.0))  # G rows of mass 1


@pytest.mark.parametrize("decay", [1.0, 0.9])
def test_decode_folds_mass_into_running_scores_in_place(device, decay):
    query, key, value, valid = make_inputs(device, group=2, slots=45, value_dim=16)
    weights = torch.tensor([1.0], device=device)
    scores = torch.rand(2, 2, 45, device=device)
    expected = scores.clone()
    _, ref_mass = decode_attention_reference(query, key, value, valid, scaling=0.3, weights=weights)
    expected = expected * decay + ref_mass
    out, folded = decode_attention_triton(query, key, value, valid, scaling=0.3, weights=weights, scores=scores,
                                          decay=decay, split_size=16)
    assert folded is scores
    torch.testing.assert_close(scores, expected, **MASS_TOLERANCE)
    assert out.shape == (2, 1, 4, 16)


def test_decode_softcap_and_padded_query_rows(device):
    query, key, value, valid = make_inputs(device, group=3, slots=33)
    query_valid = torch.tensor([[True], [False]], device=device)
    kwargs = {"scaling": 0.5, "softcap": 2.0, "query_valid": query_valid, "weights": torch.tensor([1.0], device=device)}
    out, mass = decode_attention_triton(query, key, value, valid, split_size=16, **kwargs)
    ref_out, ref_mass = decode_attention_reference(query, key, value, valid, **kwargs)
    torch.testing.assert_close(out, ref_out, **tolerance(torch.float32))
    torch.testing.assert_close(mass, ref_mass, **MASS_TOLERANCE)
    assert float(out[1].abs().max()) == 0.0 and float(mass[1].abs().max()) == 0.0
    # softcap changes the result: the test would catch a kernel that ignored it
    plain, _ = decode_attention_reference(query, key, value, valid, scaling=0.5)
    assert not torch.allclose(plain[0], ref_out[0], atol=1e-3)


def test_decode_mass_only_and_output_only(device):
    query, key, value, valid = make_inputs(device, group=2, slots=70)
    weights = torch.tensor([1.0], device=device)
    none_out, mass = decode_attention_triton(query, key, value, valid, scaling=0.2, weights=weights,
                                             want_output=False, split_size=32)
    out, no_mass = decode_attention_triton(query, key, value, valid, scaling=0.2, split_size=32)
    ref_out, ref_mass = decode_attention_reference(query, key, value, valid, scaling=0.2, weights=weights)
    assert none_out is None and no_mass is None
    torch.testing.assert_close(mass, ref_mass, **MASS_TOLERANCE)
    torch.testing.assert_close(out, ref_out, **tolerance(torch.float32))


def test_decode_row_without_visible_slot_outputs_zeros(device):
    query, key, value, valid = make_inputs(device, group=1, slots=20)
    valid[0, 1] = False  # sequence 0, KV head 1 has nothing left
    out, mass = decode_attention_triton(query, key, value, valid, scaling=0.2,
                                        weights=torch.tensor([1.0], device=device), split_size=16)
    assert torch.isfinite(out).all() and torch.isfinite(mass).all()
    assert float(out[0, 0, 1].abs().max()) == 0.0 and float(mass[0, 1].abs().max()) == 0.0
    ref_out, _ = decode_attention_reference(query, key, value, valid, scaling=0.2)
    torch.testing.assert_close(out, ref_out, **tolerance(torch.float32))


def test_decode_reads_strided_views_as_transformers_passes_them(device):
    # transformers builds the query as a transposed view [B, q, Hq, D] -> [B, Hq, q, D]
    batch, kv_heads, group, slots, dim = 1, 2, 4, 40, 16
    query = torch.randn(batch, 1, kv_heads * group, dim, device=device).transpose(1, 2)
    storage = torch.randn(batch, slots + 8, kv_heads, dim, device=device)
    key = storage[:, 4:4 + slots].transpose(1, 2)  # non-contiguous slot axis
    value = torch.randn(batch, kv_heads, slots, dim, device=device)
    valid = random_slots(batch, kv_heads, slots, device)
    weights = torch.tensor([1.0], device=device)
    out, mass = decode_attention_triton(query, key, value, valid, scaling=0.25, weights=weights, split_size=32)
    ref_out, ref_mass = decode_attention_reference(query.contiguous(), key.contiguous(), value, valid,
                                                   scaling=0.25, weights=weights)
    torch.testing.assert_close(out, ref_out, **tolerance(torch.float32))
    torch.testing.assert_close(mass, ref_mass, **MASS_TOLERANCE)


def test_decode_default_split_covers_every_slot(device):
    query, key, value, valid = make_inputs(device, batch=1, kv_heads=1, group=2, slots=200)
    weights = torch.tensor([1.0], device=device)
    out, mass = decode_attention_triton(query, key, value, valid, scaling=0.2, weights=weights)
    ref_out, ref_mass = decode_attention_reference(query, key, value, valid, scaling=0.2, weights=weights)
    torch.testing.assert_close(out, ref_out, **tolerance(torch.float32))
    torch.testing.assert_close(mass, ref_mass, **MASS_TOLERANCE)


def test_decode_without_slots_outputs_zeros_and_an_empty_mass(device):
    query, key, value, valid = make_inputs(device, group=3, slots=0)
    weights = torch.tensor([1.0], device=device)
    out, mass = decode_attention_triton(query, key, value, valid, scaling=0.2, weights=weights)
    ref_out, ref_mass = decode_attention_reference(query, key, value, valid, scaling=0.2, weights=weights)
    assert out.shape == (2, 1, 6, 32) and mass.shape == (2, 2, 0)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(out, ref_out) and ref_mass.shape == mass.shape
    out_only, _ = decode_attention_triton(query, key, value, valid, scaling=0.2)
    assert torch.equal(out_only, torch.zeros_like(out_only))


def test_decode_merges_many_splits_as_one_tile(device):
    # 40 splits of one tile each: the merge tile has 64 rows, 24 of them masked
    query, key, value, valid = make_inputs(device, batch=1, kv_heads=1, group=2, slots=40 * 64 - 5, dim=16)
    weights = torch.tensor([1.0], device=device)
    out, mass = decode_attention_triton(query, key, value, valid, scaling=0.2, weights=weights, split_size=64)
    ref_out, ref_mass = decode_attention_reference(query, key, value, valid, scaling=0.2, weights=weights)
    torch.testing.assert_close(out, ref_out, **tolerance(torch.float32))
    torch.testing.assert_close(mass, ref_mass, **MASS_TOLERANCE)


def test_split_count_follows_multiprocessors_and_slots(monkeypatch):
    monkeypatch.setattr(decode_module, "multiprocessors", lambda device: 132)  # an H200
    cpu = torch.device("cpu")
    splits = lambda batch_heads, slots: decode_module.split_count(
        slots, decode_module.default_split_size(batch_heads, slots, cpu))
    assert 16 < splits(8, 32768) <= decode_module.MAX_SPLITS  # batch 1, 8 KV heads: ~2 programs per SM
    assert splits(8, 8192) == splits(8, 32768)
    assert splits(64, 32768) == 5  # batch 8: 264 programs wanted, 64 (sequence, head) pairs
    assert splits(8, 200) == 2  # short caches: no split shorter than two tiles
    assert splits(1, 1 << 20) == decode_module.MAX_SPLITS


def test_decode_rejects_bad_arguments_with_their_names(device):
    query, key, value, valid = make_inputs(device, slots=100)
    long_key = key[:, :, :1].expand(2, 2, 64 * 65, 32)  # 65 tiles: 65 one-tile splits are too many
    with pytest.raises(ValueError, match="split_size must be at least"):
        decode_attention_triton(query, long_key, long_key, valid[..., :1].expand(2, 2, 64 * 65), scaling=0.2,
                                split_size=64)
    with pytest.raises(ValueError, match="split_size must be a positive"):
        decode_attention_triton(query, key, value, valid, scaling=0.2, split_size=-3)
    with pytest.raises(ValueError, match="key.dtype"):
        decode_attention_triton(query.half(), key, value.half(), valid, scaling=0.2)
    with pytest.raises(ValueError, match="slot_valid must be bool"):
        decode_attention_triton(query, key, value, valid.float(), scaling=0.2)
    with pytest.raises(ValueError, match="weights must hold one value"):
        decode_attention_triton(query, key, value, valid, scaling=0.2, weights=torch.ones(2, device=device))
