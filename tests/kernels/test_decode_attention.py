"""Fused decode attention + per-slot mass against its PyTorch reference and `kvpress.attention`."""

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import MASS_TOLERANCE, random_slots, tolerance

from kvpress.attention import grouped_attention
from kvpress.triton_kernels.decode_attention import (
    decode_attention_reference,
    decode_attention_triton,
)


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


def test_decode_reference_agrees_with_signals_grouped_attention(device):
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
