"""What a policy asks the attention step for, and what one forward of a layer measured."""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREFILL = "prefill"
DECODE = "decode"


@dataclass(frozen=True)
class AttentionRequest:
    """Which attention signal a policy needs for one forward of a layer.

    rows: None for every query row of the forward, or `w` for only its last `w` rows (SnapKV's
        observation window).
    decay: per-row weight `decay ** age` (age 0 for the newest row); the running score is also
        multiplied by `decay ** q` before the new mass is added (A2SF's forgetting factor; 1 = H2O).
    accumulate: add the mass to the running score (H2O, A2SF) or replace it (SnapKV, TOVA).
    """

    rows: int | None = None
    decay: float = 1.0
    accumulate: bool = True


@dataclass(frozen=True)
class Signals:
    """What one forward of a layer measured: `mass [B, Hkv, S]` fp32 as the request asked (None when
    nothing was asked), `output [B, q, Hq, Dv]` the attention output, `q` new tokens in `phase`;
    `query [B, Hq, q, D]` the forward's queries as the attention function received them (RoPE applied)
    and `module` the model's attention module (config, head_dim, scaling), for policies that score
    with the queries themselves (ExpectedAttention, KVzip). `folded`: the fused decode kernel already
    folded the mass into the layer's `ScoreState`."""

    phase: str
    q: int
    request: AttentionRequest | None
    mass: torch.Tensor | None
    output: torch.Tensor
    query: torch.Tensor | None = None
    module: torch.nn.Module | None = None
    folded: bool = False
