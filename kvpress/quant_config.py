"""`KVQuant`: how a `PrunedCache` stores kept slots quantized (KIVI), and the sizing rules that follow.

    cache = PrunedCache(SnapKV(budget=1024), quantization=KVQuant(bits=4, group_size=32, residual=128))

The store itself is kvpress/quantized.py, its primitives kvpress/kivi.py, memory budgets in bytes
kvpress/memory.py (docs/quantization.md describes all three).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BITS = (2, 4, 8)


def check_bits(owner: str, bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:  # 4.0 would fail at packing
        raise ValueError(f"{owner}: bits must be one of {BITS}, got {bits!r}")


@dataclass(frozen=True)
class KVQuant:
    """How a `PrunedCache` stores kept slots: `bits` in {2, 4, 8}, groups of `group_size` (tokens per
    channel for keys, channels per token for values), and the newest `residual` slots in full precision
    until a group of `group_size` older slots fills. KIVI paper defaults: group 32, residual 128."""

    bits: int = 4
    group_size: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        check_bits("KVQuant", self.bits)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"KVQuant: group_size must be an int >= 1 that divides head_dim, got {self.group_size!r}")
        if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"KVQuant: residual must be an int >= 0 (full-precision recent slots), got {self.residual!r}")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % self.group_size:
            divisors = [g for g in range(1, head_dim + 1) if head_dim % g == 0]
            raise ValueError(f"KVQuant: group_size must divide head_dim {head_dim} (values are grouped per token "
                             f"over channels); got group_size={self.group_size}, accepted: {divisors}")
        if (head_dim * self.bits) % 8:
            raise ValueError(f"KVQuant: head_dim {head_dim} times bits {self.bits} must be a multiple of 8 to pack codes")

    def bytes_for_slots(self, slots: int, head_dim: int, itemsize: int) -> int:
        """Upper bound of the bytes a layer's storage holds per KV head (per batch row) when it keeps
        `slots` slots. Below `residual + G` slots nothing is quantized: `slots` full-precision slots.
        Otherwise the residual at its largest (`residual + G - 1` full-precision slots) and up to `slots`
        quantized slots (a head's quantized region holds at most `slots` slots, holes of heads that kept
        more of the residual included), with value scales/zeros per slot, key scales/zeros for the dense
        blocks plus the reserve, and the int32 block counts."""
        tail = self.residual + self.group_size - 1
        if slots <= tail:
            return 2 * slots * head_dim * itemsize
        blocks = math.ceil(slots / self.group_size) + reserve_blocks(slots, self.group_size)
        codes = 2 * slots * head_dim * self.bits // 8
        value_params = 2 * slots * (head_dim // self.group_size) * itemsize
        key_params = blocks * (2 * head_dim * itemsize + 4)
        return codes + value_params + key_params + 2 * tail * head_dim * itemsize


def reserve_blocks(quantized: int, group: int) -> int:
    """Thinned-out key blocks tolerated beyond the dense count before the store re-packs: a quarter of
    the dense count, at least one."""
    return max(1, math.ceil(quantized / group) // 4)

