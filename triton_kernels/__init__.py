"""Triton kernels for a pruned KV cache, each beside the PyTorch reference it must match.

| module | kernel | reference |
| --- | --- | --- |
| `decode_attention` | fused decode attention + per-slot mass (+ running score) | `decode_attention_reference` |
| `prefill_mass` | attention forward with log-sum-exp; per-slot mass of a block of queries | `attention_with_lse_reference`, `prefill_mass_reference` |
| `compaction` | gather of the kept slots of every per-slot tensor | `compact_slots_reference` |

Each module's dispatch function (`decode_attention`, `attention_with_lse`, `prefill_mass`,
`compact_slots`) runs Triton on CUDA tensors when triton is installed and the reference elsewhere;
`backend='triton'|'torch'` forces one. See docs/kernels.md.
"""

from kvpress.triton_kernels._common import HAS_TRITON, use_triton
from kvpress.triton_kernels.compaction import compact_slots, compact_slots_reference, compact_slots_triton
from kvpress.triton_kernels.decode_attention import (
    decode_attention,
    decode_attention_reference,
    decode_attention_triton,
)
from kvpress.triton_kernels.dispatch import attention_signals
from kvpress.triton_kernels.prefill_mass import (
    attention_with_lse,
    attention_with_lse_reference,
    attention_with_lse_triton,
    prefill_mass,
    prefill_mass_reference,
    prefill_mass_triton,
)

__all__ = [
    "HAS_TRITON",
    "attention_signals",
    "attention_with_lse",
    "attention_with_lse_reference",
    "attention_with_lse_triton",
    "compact_slots",
    "compact_slots_reference",
    "compact_slots_triton",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_triton",
    "prefill_mass",
    "prefill_mass_reference",
    "prefill_mass_triton",
    "use_triton",
]
