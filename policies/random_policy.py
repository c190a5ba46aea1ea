"""Random eviction: the control every scoring policy must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.policy import Policy

_MASK32 = 0xFFFFFFFF


def hash_uniform(*keys: torch.Tensor) -> torch.Tensor:
    """A float in [0, 1) per element, a fixed function of the integer `keys` (broadcast together):
    a 32-bit multiply-xorshift mix (the finaliser of MurmurHash3) of their combination."""
    mixed = torch.zeros((), dtype=torch.long, device=keys[0].device)
    for key, multiplier in zip(keys, (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)):
        mixed = ((mixed ^ (key.long() & _MASK32)) * multiplier) & _MASK32
        mixed = mixed ^ (mixed >> 15)
    mixed = ((mixed ^ (mixed >> 16)) * 0x85EBCA6B) & _MASK32
    mixed = ((mixed ^ (mixed >> 13)) * 0xC2B2AE35) & _MASK32
    mixed = mixed ^ (mixed >> 16)
    return mixed.float() / float(1 << 32)


@dataclass
class RandomPolicy(Policy):
    """Keep a uniformly random subset of the slots (plus sinks and window), reproducibly.

    A baseline, not a paper. The score of a slot is a hash of `(seed, layer, KV head, token position)`
    mapped to [0, 1): two runs with the same seed evict the same tokens, a row evicts the same tokens
    alone or in any batch order, and the policy keeps no state. With `budget=1.0` it never evicts.
    """

    spec_name = "random"

    budget: int | float = 0.25
    seed: int = 0

    def score(self, layer) -> torch.Tensor:
        heads = torch.arange(layer.num_heads, device=layer.positions.device)[:, None]
        seed = torch.tensor(self.seed, device=layer.positions.device)
        index = torch.tensor(layer.layer_idx, device=layer.positions.device)
        return hash_uniform(seed, index, heads, layer.positions)
