"""SnapKV's pooling runs over the neighbouring slots that hold a token: a slot dropped while decoding
keeps its old score in place, and neither that score nor the hole itself may change the pool."""

import pytest
import torch

from kvpress.policies.snapkv import pool_slots


def naive_pool(scores, valid, kernel, pooling):
    """Pool each valid slot over the `kernel // 2` valid slots on either side (as if the holes were
    squeezed out)."""
    kept = [j for j in range(scores.shape[-1]) if valid[j]]
    out = torch.empty_like(scores)
    for rank, index in enumerate(kept):
        window = kept[max(0, rank - kernel // 2): rank + kernel // 2 + 1]
        values = [float(scores[j]) for j in window]
        if pooling == "max":
            out[index] = max(values)
        else:
            out[index] = sum(values) / len(values)
    return out


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_pooling_ignores_slots_without_a_token(pooling):
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(1, 1, 20, generator=generator)
    valid = torch.rand(1, 1, 20, generator=generator) > 0.3
    scores[~valid] = 50.0  # stale scores of dropped slots
    pooled = pool_slots(scores, 5, pooling, valid)
    expected = naive_pool(scores[0, 0], valid[0, 0], 5, pooling)
    torch.testing.assert_close(pooled[0, 0][valid[0, 0]], expected[valid[0, 0]])
    assert float(pooled[valid].max()) < 50.0
