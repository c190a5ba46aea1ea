"""ExpectedAttention: the attention future queries are expected to give each slot."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpress.budgets import check_bool, check_int, check_number
from kvpress.policy import Policy
from kvpress.state import State


@dataclass
class ExpectedAttention(Policy):
    """Score each slot by the attention that the next `future` queries are expected to give it, times
    the norm of its value.

    Devoto, Jeblick and Jégou, "Expected Attention: KV Cache Compression by Estimating Attention from
    Future Queries Distribution", arXiv 2510.00636. Queries before RoPE are modelled as a Gaussian
    `N(mu, Sigma)` per query head, estimated from the queries seen so far (prefill rows and every
    decoding step, the first `sinks` positions left out as outliers). A query at future position
    `t + j` is `R(t + j) q`, so averaging RoPE's rotation over the next `future` positions gives
    `R = mean_j R(t + j)`, `mu' = R mu`, `Sigma' = R Sigma R^T`. With `s` the attention scaling,
    `E[exp(s q'.k)] = exp(s mu'.k + s^2/2 k^T Sigma' k)` (Gaussian moment generating function); a
    softmax over the head's slots gives the expected attention `a_j`, averaged over the query heads of
    each KV group, and the score is `(a_j + epsilon) * ||v_j||_2` (the slot's expected contribution to
    the attention output). `t` is the number of real tokens seen, so the statistics and the rotation
    follow the generation. The first `sinks` positions are left out of the softmax, as the reference
    removes them before scoring (they are always kept).

    Defaults follow NVIDIA kvpress's ExpectedAttentionPress (the authors' code): `future = 512`,
    covariance and value norm on, `epsilon = 0`, 4 sinks (kept, and left out of the statistics).
    `decay < 1` weighs query `i` steps old by `decay ** i` (recent queries count more) [our choice];
    1 weighs every query equally, as the reference does at prefill.
    State per layer (`QueryMoments`): running weighted sums of the pre-RoPE queries and of their outer
    products, `[B, Hq, D]` and `[B, Hq, D, D]`; the queries come un-rotated from `Signals.query` with the
    model's RoPE frequencies (`rope_frequencies`).
    """

    spec_name = "expectedattention"

    budget: int | float = 0.25
    sinks: int = 4
    future: int = 512
    covariance: bool = True
    value_norm: bool = True
    epsilon: float = 0.0
    decay: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("ExpectedAttention", "future", self.future, 1, "positions averaged")
        for name in ("covariance", "value_norm"):
            check_bool("ExpectedAttention", name, getattr(self, name))
        check_number("ExpectedAttention", "epsilon", self.epsilon, 0)
        check_number("ExpectedAttention", "decay", self.decay, 0, 1, open_low=True)

    def new_layer_state(self, layer) -> QueryMoments:
        return QueryMoments()

    def raw_scores(self, layer) -> None:
        return None  # no attention mass is measured (CAOTE refuses this policy)

    def update(self, layer, signals) -> None:
        if signals.query is None:
            raise ValueError("ExpectedAttention needs the forward's queries (Signals.query)")
        state = layer.state(self)
        if state.rope is None:
            state.rope = rope_frequencies(signals.module)
            state.scaling = float(getattr(signals.module, "scaling", signals.query.shape[-1] ** -0.5))
        q = signals.q
        positions = layer.positions[:, 0, -q:]  # [B, q], -1 for padding
        pre_rope = unrotate(signals.query.float(), positions, *state.rope)  # [B, Hq, q, D]
        age = torch.arange(q - 1, -1, -1, device=pre_rope.device, dtype=torch.float32)
        weights = torch.exp(age * math.log(self.decay)) * (positions >= self.sinks)  # [B, q]
        state.add(pre_rope, weights, self.decay ** q)

    def score(self, layer) -> torch.Tensor:
        state = layer.state(self)
        mean, cov = state.moments()  # [B, Hq, D], [B, Hq, D, D]
        rotation = average_rotation(layer.real_seen, self.future, *state.rope, mean.shape[-1])  # [B, D, D]
        mean = torch.einsum("bde,bhe->bhd", rotation, mean)
        keys = layer.keys.float()  # [B, Hkv, P, D]
        batch, kv_heads, _, dim = keys.shape
        group = mean.shape[1] // kv_heads
        scale = state.scaling
        logits = torch.einsum("bhgd,bhpd->bhgp", mean.view(batch, kv_heads, group, dim), keys) * scale
        if self.covariance:
            cov = rotation[:, None] @ cov @ rotation[:, None].transpose(-1, -2)
            spread = torch.einsum("bhpd,bhgde,bhpe->bhgp", keys, cov.view(batch, kv_heads, group, dim, dim), keys)
            logits = logits + 0.5 * scale * scale * spread
        # the sinks leave the softmax, as in the reference (they are kept anyway, as protected slots):
        # with them inside, the mass they draw rescales each query head of a group differently
        counted = layer.valid & (layer.positions >= self.sinks)  # [B, Hkv, P]
        logits = logits.masked_fill(~counted[:, :, None], float("-inf"))
        expected = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=2)  # [B, Hkv, P]
        if self.value_norm:
            expected = (expected + self.epsilon) * layer.values.float().norm(dim=-1)
        return expected


@dataclass(eq=False)
class QueryMoments(State):
    """Weighted moments of the pre-RoPE queries of one layer: `weight [B, Hq]`, `first [B, Hq, D]`
    (sum of `w q`), `second [B, Hq, D, D]` (sum of `w q q^T`); fp32, not aligned with slots. `rope`
    `(inv_freq, attention_scaling, rotary_dim)` and the attention `scaling` are the model's, read at
    the first forward."""

    weight: torch.Tensor | None = None
    first: torch.Tensor | None = None
    second: torch.Tensor | None = None
    rope: tuple | None = None
    scaling: float = 1.0
    row_fields: ClassVar[tuple[str, ...]] = ("weight", "first", "second")

    def add(self, queries: torch.Tensor, weights: torch.Tensor, forget: float) -> None:
        """Fold `queries [B, Hq, q, D]` with row weights `weights [B, q]`, older sums times `forget`."""
        weight = weights[:, None, :].expand(-1, queries.shape[1], -1).sum(-1)  # [B, Hq]
        first = torch.einsum("bq,bhqd->bhd", weights, queries)
        second = torch.einsum("bq,bhqd,bhqe->bhde", weights, queries, queries)
        if self.weight is None:
            self.weight, self.first, self.second = weight, first, second
        else:
            self.weight = self.weight * forget + weight
            self.first = self.first * forget + first
            self.second = self.second * forget + second

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean `[B, Hq, D]` and covariance `[B, Hq, D, D]` (zeros before any query was counted)."""
        weight = self.weight.clamp(min=1e-12)[..., None]
        mean = self.first / weight
        cov = self.second / weight[..., None] - mean[..., :, None] * mean[..., None, :]
        return mean, cov


def rope_frequencies(module) -> tuple[torch.Tensor, float, int]:
    """`(inv_freq [D_rot / 2], attention_scaling, D_rot)` of the RoPE the attention `module` applies,
    from its config as transformers computes them (per layer type where the config has one per type,
    as Gemma3 does). Models with the half-split layout (`rotate_half`) only: every supported family."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if module is None:
        raise ValueError("ExpectedAttention needs the model's attention module (Signals.module) to read its RoPE")
    config = module.config
    head_dim = getattr(module, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = getattr(config, "rope_parameters", None) or {}
    layer_type = None
    if "rope_type" not in params:  # one entry per layer type
        types = getattr(config, "layer_types", None)
        layer_type = types[module.layer_idx] if types else "full_attention"
        params = params[layer_type]
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0)
    rotary_dim = int(head_dim * partial)
    if params.get("rope_type", "default") == "default":
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        return inv_freq, 1.0, rotary_dim
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, **kwargs)
    return inv_freq.float().cpu(), float(scaling), 2 * inv_freq.shape[-1]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def unrotate(query: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
             rotary_dim: int) -> torch.Tensor:
    """Pre-RoPE queries from `query [B, H, q, D]` rotated at `positions [B, q]`: the inverse rotation,
    divided by RoPE's attention scaling. Padding rows (position -1) come out rotated back by one
    position; their weight is zero."""
    angles = positions.float()[..., None] * inv_freq.to(query.device)  # [B, q, D_rot / 2]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[:, None]  # [B, 1, q, D_rot]
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[:, None]
    rot, rest = query[..., :rotary_dim], query[..., rotary_dim:]
    return torch.cat([(rot * cos - rotate_half(rot) * sin) / scaling, rest], dim=-1)


def average_rotation(seen: torch.Tensor, future: int, inv_freq: torch.Tensor, scaling: float,
                     rotary_dim: int, dim: int) -> torch.Tensor:
    """`[B, D, D]`: RoPE's rotation (times its attention scaling) averaged over positions
    `seen .. seen + future - 1` of each row; identity on dimensions RoPE leaves alone."""
    offsets = torch.arange(future, device=seen.device, dtype=torch.float32)
    angles = (seen.float()[:, None] + offsets)[..., None] * inv_freq.to(seen.device)  # [B, F, D_rot / 2]
    cos, sin = angles.cos().mean(1) * scaling, angles.sin().mean(1) * scaling  # [B, D_rot / 2]
    half = rotary_dim // 2
    matrix = torch.eye(dim, device=seen.device).repeat(seen.shape[0], 1, 1)
    index = torch.arange(half, device=seen.device)
    # x' = cos x + sin rotate_half(x): x'_i = cos x_i - sin x_{i+h}, x'_{i+h} = cos x_{i+h} + sin x_i
    matrix[:, index, index] = cos
    matrix[:, index + half, index + half] = cos
    matrix[:, index, index + half] = -sin
    matrix[:, index + half, index] = sin
    return matrix
