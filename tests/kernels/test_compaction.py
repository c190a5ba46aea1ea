"""One-launch compaction against the per-tensor torch gathers."""

import pytest
import torch

pytest.importorskip("triton")

from kvpress.triton_kernels.compaction import compact_slots_reference, compact_slots_triton


def kept_indices(batch, kv_heads, slots, kept, device):
    return torch.rand(batch, kv_heads, slots, device=device).argsort(-1)[..., :kept].sort(-1).values


@pytest.mark.parametrize(
    "dim, value_dim, kept, dtype",
    [(16, 16, 21, torch.float32), (64, 64, 40, torch.bfloat16), (24, 40, 5, torch.float16)],
)
def test_compaction_equals_torch_gathers(device, dim, value_dim, kept, dtype):
    batch, kv_heads, slots = 2, 3, 50
    keys = torch.randn(batch, kv_heads, slots, dim, device=device).to(dtype)
    values = torch.randn(batch, kv_heads, slots, value_dim, device=device).to(dtype)
    positions = torch.randint(-1, 1000, (batch, kv_heads, slots), device=device)
    scores = torch.rand(batch, kv_heads, slots, device=device)
    valid = torch.rand(batch, kv_heads, slots, device=device) < 0.6
    indices = kept_indices(batch, kv_heads, slots, kept, device)
    got = compact_slots_triton(keys, values, positions, scores, indices, valid)
    want = compact_slots_reference(keys, values, positions, scores, indices, valid)
    for name, a, b in zip(("keys", "values", "positions", "scores", "valid"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_compaction_of_strided_storage_without_valid(device):
    batch, kv_heads, slots, dim = 1, 2, 37, 32
    keys = torch.randn(batch, slots, kv_heads, dim, device=device).transpose(1, 2)  # non-contiguous
    values = torch.randn(batch, kv_heads, slots, dim, device=device)
    positions = torch.arange(slots, device=device).expand(batch, kv_heads, slots)  # stride 0 on two axes
    scores = torch.rand(batch, kv_heads, slots, device=device)
    indices = kept_indices(batch, kv_heads, slots, 17, device)
    got = compact_slots_triton(keys, values, positions, scores, indices)
    want = compact_slots_reference(keys, values, positions, scores, indices)
    assert got[4] is None and want[4] is None
    for a, b in zip(got[:4], want[:4]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [-1, 50])
def test_compaction_refuses_indices_outside_the_slots(device, bad):
    keys = torch.randn(1, 2, 50, 16, device=device)
    positions = torch.arange(50, device=device).expand(1, 2, 50)
    scores = torch.rand(1, 2, 50, device=device)
    indices = kept_indices(1, 2, 50, 8, device)
    with pytest.raises(ValueError, match="indices must be int64/int32"):
        compact_slots_triton(keys, keys, positions, scores, indices.float())
    if device.type == "cuda":
        pytest.skip("on a GPU the range check is a device-side assertion, which ends the CUDA context")
    indices[0, 1, 3] = bad
    with pytest.raises(ValueError, match=r"indices must be slots in \[0, P=50\), got values in"):
        compact_slots_triton(keys, keys, positions, scores, indices)
