"""CAOTE: evict the slot whose removal changes the attention output least."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.policy import Wrapper


@dataclass
class CAOTE(Wrapper):
    """Replace the inner policy's score by the attention-output error evicting the slot would cause.

    Goel et al., "CAOTE: KV Caching through Attention Output Error based Token Eviction",
    arXiv 2504.14051. For one query, `o = sum_j a_j v_j`; removing slot `j` and renormalising gives
    `o' = (o - a_j v_j) / (1 - a_j)`, so `||o - o'||_2 = a_j / (1 - a_j) * ||o - v_j||_2`.
    `a_j` is the attention weight of slot `j` for its KV head: the inner policy's attention mass,
    per KV head and unpooled (never its final score, which may be pooled as SnapKV's or summed over
    heads as TOVA's), normalised over the head's valid slots, `a_j = m_j / sum_i m_i`; window and
    last-row masses become the mean attention of those rows, accumulated masses the average
    attention. The wrapper takes `o = sum_j a_j v_j` with the head's cached values and scores
    `c_j = a_j / max(1 - a_j, 1e-6) * ||o - v_j||_2` (fp32). `fast=True` is FastCAOTE: `o` is the
    unweighted mean of the values.
    GQA [our choice]: the mass is summed over the query heads of the KV group, so `a` is the group's
    mean attention and the values are the shared ones. The inner policy's protection applies after
    scoring. CAOTE needs attention weights: attention-free inner policies are refused.
    """

    spec_name = "caote"
    changes_scores = True
    needs_attention = True

    fast: bool = False

    def score(self, layer) -> torch.Tensor:
        valid = layer.valid  # [B, Hkv, P]
        mass = self.raw_scores(layer).float().clamp(min=0.0).masked_fill(~valid, 0.0)
        total = mass.sum(dim=-1, keepdim=True)
        alpha = mass / total.clamp_min(torch.finfo(torch.float32).tiny)  # [B, Hkv, P]
        values = layer.values.float().masked_fill(~valid[..., None], 0.0)  # [B, Hkv, P, D]
        if self.fast:
            output = values.sum(dim=-2) / valid.sum(dim=-1, keepdim=True).clamp_min(1)  # [B, Hkv, D]
        else:
            output = torch.einsum("bhp,bhpd->bhd", alpha, values)
        distance = (output[..., None, :] - values).norm(dim=-1)  # [B, Hkv, P]
        return alpha / (1.0 - alpha).clamp_min(1e-6) * distance
