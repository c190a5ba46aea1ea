"""SnapKV's pooling takes only slots that hold a token: a slot dropped while decoding keeps its old
score in place, and that score must not raise its neighbours'."""

import pytest
import torch

from kvpress.policies.snapkv import pool_slots


def naive_pool(scores, valid, kernel, pooling):
    out = torch.empty_like(scores)
    for index in range(scores.shape[-1]):
        window = range(max(0, index - kernel // 2), min(scores.shape[-1], index + kernel // 2 + 1))
        values = [float(scores[j]) for j in window if valid[j]]
        if not values:
            out[index] = torch.finfo(scores.dtype).min if pooling == "max" else 0.0
        else:
            out[index] = max(values) if pooling == "max" else sum(values) / len(values)
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
