"""Prefill attention with log-sum-exp and the O(n) per-slot mass pass, against their PyTorch
references and `kvpress.reference_attention.grouped_attention`."""

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import MASS_TOLERANCE, random_slots, tolerance

from kvpress.attention_path import row_weights
from kvpress.reference_attention import grouped_attention
from kvpress.triton_kernels.prefill_mass import (
    attention_with_lse_reference,
    attention_with_lse_triton,
    prefill_mass_reference,
    prefill_mass_triton,
)

BLOCKS = (16, 16)  # several tiles along both axes at these lengths


def make_inputs(device, batch=2, kv_heads=2, group=3, q_len=20, slots=53, dim=32, dtype=torch.float32):
    query = torch.randn(batch, kv_heads * group, q_len, dim, device=device).to(dtype)
    key = torch.randn(batch, kv_heads, slots, dim, device=device).to(dtype)
    value = torch.randn(batch, kv_heads, slots, dim, device=device).to(dtype)
    return query, key, value, random_slots(batch, kv_heads, slots, device, visible_tail=q_len)


@pytest.mark.parametrize(
    "dim, group, q_len, slots, dtype",
    [(16, 1, 37, 37, torch.float32),  # plain prefill
     (32, 3, 20, 53, torch.float16),  # chunked prefill over a pruned history
     (64, 4, 33, 33, torch.bfloat16)],
)
def test_attention_and_mass_match_reference(device, dim, group, q_len, slots, dtype):
    query, key, value, valid = make_inputs(device, group=group, q_len=q_len, slots=slots, dim=dim, dtype=dtype)
    weights = torch.ones(q_len, device=device)
    out, lse = attention_with_lse_triton(query, key, value, valid, scaling=dim ** -0.5, blocks=BLOCKS)
    ref_out, ref_lse = attention_with_lse_reference(query, key, value, valid, scaling=dim ** -0.5)
    torch.testing.assert_close(out.float(), ref_out.float(), **tolerance(dtype))
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    assert out.shape == (2, q_len, 2 * group, dim) and out.dtype == dtype

    mass = prefill_mass_triton(query, key, valid, scaling=dim ** -0.5, weights=weights, lse=lse, blocks=BLOCKS)
    ref_mass = prefill_mass_reference(query, key, valid, scaling=dim ** -0.5, weights=weights)
    torch.testing.assert_close(mass, ref_mass, **MASS_TOLERANCE)
    # every row's probabilities sum to one: total mass = G * q per KV head
    torch.testing.assert_close(mass.sum(-1), torch.full_like(mass.sum(-1), group * q_len), rtol=1e-4, atol=1e-3)


def test_references_agree_with_library_grouped_attention(device):
    query, key, value, valid = make_inputs(device, group=2, q_len=9, slots=25)
    query_valid = torch.ones(2, 9, dtype=torch.bool, device=device)
    query_valid[1, :3] = False  # left padding
    weights = row_weights(9, 4, 0.8, device)
    kwargs = {"scaling": 0.3, "softcap": 4.0, "query_valid": query_valid}
    ref_out, _ = attention_with_lse_reference(query, key, value, valid, **kwargs)
    ref_mass = prefill_mass_reference(query, key, valid, weights=weights, **kwargs)
    out, mass = grouped_attention(*(t.cpu() for t in (query, key, value, valid)), scaling=0.3, softcap=4.0,
                                  query_valid=query_valid.cpu(), weights=weights.cpu())
    torch.testing.assert_close(ref_out.cpu(), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_mass.cpu(), mass, atol=1e-6, rtol=1e-5)


def test_mass_computes_its_own_lse_with_decay_weights_padding_and_softcap(device):
    query, key, _value, valid = make_inputs(device, group=2, q_len=21, slots=40, dim=16)
    query_valid = torch.ones(2, 21, dtype=torch.bool, device=device)
    query_valid[0, :5] = False
    weights = row_weights(21, None, 0.9, device)  # A2SF: decay ** age
    kwargs = {"scaling": 0.25, "softcap": 3.0, "query_valid": query_valid, "weights": weights}
    mass = prefill_mass_triton(query, key, valid, blocks=BLOCKS, **kwargs)
    ref_mass = prefill_mass_reference(query, key, valid, **kwargs)
    torch.testing.assert_close(mass, ref_mass, **MASS_TOLERANCE)
    unpadded = prefill_mass_reference(query, key, valid, scaling=0.25, softcap=3.0, weights=weights)
    assert not torch.allclose(unpadded[0], ref_mass[0])  # padding rows matter: the test can fail


@pytest.mark.parametrize("rows", [1, 6])  # TOVA's last row, a SnapKV window
def test_mass_of_the_last_rows_matches_library_attention(device, rows):
    query, key, value, valid = make_inputs(device, group=3, q_len=30, slots=45, dim=16)
    window = query[:, :, -rows:]  # a strided view, as cache.py passes it
    weights = torch.ones(rows, device=device)
    mass = prefill_mass_triton(window, key, valid, scaling=0.25, weights=weights, blocks=BLOCKS)
    _, expected = grouped_attention(window.cpu(), key.cpu(), value.cpu(), valid.cpu(), scaling=0.25,
                                    weights=weights.cpu(), want_output=False)
    torch.testing.assert_close(mass.cpu(), expected, **MASS_TOLERANCE)


def test_lse_only_pass_and_lse_from_the_caller(device):
    query, key, value, valid = make_inputs(device, group=4, q_len=18, slots=18, dim=32, dtype=torch.float16)
    none_out, lse = attention_with_lse_triton(query, key, value, valid, scaling=0.2, want_output=False,
                                              blocks=BLOCKS)
    _, ref_lse = attention_with_lse_reference(query, key, value, valid, scaling=0.2)
    assert none_out is None
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    weights = torch.ones(18, device=device)
    mass = prefill_mass_triton(query, key, valid, scaling=0.2, weights=weights, lse=ref_lse, blocks=(16, 32))
    ref_mass = prefill_mass_reference(query, key, valid, scaling=0.2, weights=weights, lse=ref_lse)
    torch.testing.assert_close(mass, ref_mass, **MASS_TOLERANCE)


def test_row_without_visible_slot_outputs_zeros_and_no_mass(device):
    query, key, value, valid = make_inputs(device, batch=1, group=1, q_len=4, slots=20, dim=16)
    valid[0, 0, :17] = False  # head 0: rows 0 and 1 see only masked slots
    valid[0, 0, 16:] = torch.tensor([False, False, True, True], device=device)
    out, lse = attention_with_lse_triton(query, key, value, valid, scaling=0.2, blocks=BLOCKS)
    mass = prefill_mass_triton(query, key, valid, scaling=0.2, weights=torch.ones(4, device=device), lse=lse,
                               blocks=BLOCKS)
    assert torch.isinf(lse[0, 0, :2]).all() and torch.isfinite(out).all() and torch.isfinite(mass).all()
    assert float(out[0, :2, 0].abs().max()) == 0.0
    ref_out, ref_lse = attention_with_lse_reference(query, key, value, valid, scaling=0.2)
    torch.testing.assert_close(out, ref_out, **tolerance(torch.float32))
    torch.testing.assert_close(lse, ref_lse)
