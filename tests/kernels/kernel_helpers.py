"""Shared helpers of the kernel tests (tolerances, random slot masks)."""

import torch


def tolerance(dtype: torch.dtype) -> dict:
    """Output tolerance against an fp32 reference: the dtype's rounding (and tensor-core sums on GPU)."""
    return {torch.float32: {"atol": 2e-5, "rtol": 1e-4}, torch.float16: {"atol": 3e-3, "rtol": 3e-3},
            torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}[dtype]


# the mass is a sum of fp32 probabilities whatever the operand dtype
MASS_TOLERANCE = {"atol": 2e-5, "rtol": 1e-4}


def random_slots(batch, kv_heads, slots, device, keep=0.7, visible_tail=1):
    """`[B, Hkv, S]` bool with about `1 - keep` masked slots; the last `visible_tail` always valid
    (a layer's new tokens are)."""
    valid = torch.rand(batch, kv_heads, slots, device=device) < keep
    valid[..., slots - visible_tail:] = True
    return valid
