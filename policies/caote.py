"""CAOTE: evict the slot whose removal changes the attention output least."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.policies._shared import shift_nonnegative
from kvpress.policy import Wrapper


@dataclass
class CAOTE(Wrapper):
    """Replace the inner policy's score by the attention-output error evicting the slot would cause.

    Goel et al., "CAOTE: KV Caching through Attention Output Error based Token Eviction",
    arXiv 2504.14051. For one query, `o = sum_j a_j v_j`; removing slot `j` and renormalising gives
    `o' = (o - a_j v_j) / (1 - a_j)`, so `||o - o'||_2 = a_j / (1 - a_j) * ||o - v_j||_2`.
    The wrapper normalises the inner scores of each KV head over its valid slots,
    `a_j = s_j / sum_i s_i` (window-attention and last-row policies already score probabilities;
    accumulated scores become their average attention), takes `o = sum_j a_j v_j` with the head's
    cached values, and scores `c_j = a_j / max(1 - a_j, 1e-6) * ||o - v_j||_2` (fp32).
    `fast=True` is FastCAOTE: `o` is the unweighted mean of the values.
    GQA [our choice]: the inner score is already summed over the query heads of the KV group, so
    `a` is the group's mean attention and the values are the shared ones. Negative inner scores are
    shifted to >= 0 per head first [our choice]. The inner policy's protection applies after
    scoring. No hyperparameters of its own.
    """

    fast: bool = False

    def score(self, layer) -> torch.Tensor:
        valid = layer.valid  # [B, Hkv, P]
        inner = shift_nonnegative(self.inner.score(layer).float(), valid).masked_fill(~valid, 0.0)
        total = inner.sum(dim=-1, keepdim=True)
        alpha = inner / total.clamp_min(torch.finfo(torch.float32).tiny)  # [B, Hkv, P]
        values = layer.values.float().masked_fill(~valid[..., None], 0.0)  # [B, Hkv, P, D]
        if self.fast:
            output = values.sum(dim=-2) / valid.sum(dim=-1, keepdim=True).clamp_min(1)  # [B, Hkv, D]
        else:
            output = torch.einsum("bhp,bhpd->bhd", alpha, values)
        distance = (output[..., None, :] - values).norm(dim=-1)  # [B, Hkv, P]
        return alpha / (1.0 - alpha).clamp_min(1e-6) * distance
