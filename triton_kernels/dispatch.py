"""`kvpress.reference_attention.grouped_attention`'s contract computed by the kernels: the CUDA path of
`PrunedLayer.attend`.

One query token (decode) goes to the fused decode kernel; a block of queries (prefill) to the
attention forward with log-sum-exp, then to the mass pass that reuses that log-sum-exp.
"""

from __future__ import annotations

import torch

from kvpress.triton_kernels.decode_attention import decode_attention
from kvpress.triton_kernels.prefill_mass import attention_with_lse, prefill_mass


def attention_signals(
    query: torch.Tensor,  # [B, Hq, q, D]
    key: torch.Tensor,  # [B, Hkv, S, D]
    value: torch.Tensor,  # [B, Hkv, S, Dv]
    slot_valid: torch.Tensor,  # [B, Hkv, S] bool
    *,
    scaling: float,
    softcap: float | None = None,
    query_valid: torch.Tensor | None = None,  # [B, q] bool
    weights: torch.Tensor | None = None,  # [q] fp32; None: no mass
    want_output: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`(output [B, q, Hq, Dv] | None, mass [B, Hkv, S] fp32 | None)`, as `grouped_attention`."""
    if not want_output and weights is None:
        return None, None
    if query.shape[2] == 1:
        return decode_attention(query, key, value, slot_valid, scaling=scaling, softcap=softcap,
                                query_valid=query_valid, weights=weights, want_output=want_output, backend=backend)
    output, lse = attention_with_lse(query, key, value, slot_valid, scaling=scaling, softcap=softcap,
                                     query_valid=query_valid, want_output=want_output, backend=backend)
    mass = None
    if weights is not None:
        mass = prefill_mass(query, key, slot_valid, scaling=scaling, softcap=softcap, query_valid=query_valid,
                            weights=weights, lse=lse, backend=backend)
    return output, mass
