"""Shared references for the policy tests: tiny eager models and naive attention quantities computed
from the full eager attention matrix (never from kvpress)."""

from __future__ import annotations

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvpress import PrunedCache


def tiny_model(layers: int = 2, heads: int = 4, kv_heads: int = 2, impl: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256)
    config._attn_implementation = impl
    return LlamaForCausalLM(config).eval()


def token_ids(length: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def eager_reference(model, ids: torch.Tensor):
    """Per layer: `(A [B, Hq, T, T] float64, keys [B, Hkv, T, D], values [B, Hkv, T, D])` of a full
    forward with transformers' own eager attention and DynamicCache."""
    out = model(ids, output_attentions=True, use_cache=True, cache=DynamicCache())
    return [(att.double(), layer.keys.double(), layer.values.double())
            for att, layer in zip(out.attentions, out.past_key_values.layers)]


def group_sum(attention: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """`[B, Hq, T, S]` -> `[B, Hkv, T, S]`: sum over the query heads of each KV group."""
    batch, heads, rows, cols = attention.shape
    return attention.view(batch, kv_heads, heads // kv_heads, rows, cols).sum(2)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, policy, extra: torch.Tensor | None = None) -> PrunedCache:
    """Run the prompt, then feed `extra` tokens one decoding step at a time."""
    cache = PrunedCache(policy)
    model(ids, cache=cache, use_cache=True)
    for token in (extra[0] if extra is not None else []):
        model(token.view(1, 1), cache=cache, use_cache=True)
    return cache


def kept_positions(layer, row: int = 0, head: int = 0) -> list[int]:
    keep = layer.valid[row, head]
    return sorted(layer.positions[row, head][keep].tolist())
