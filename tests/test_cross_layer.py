"""The cross-layer prefill stage: a policy that allocates across layers sees every layer's scores once
the prompt has ended, the layers then compact to the sizes it chose and keep them while decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tiny_models import random_ids, tiny_model

from kvpress import PrunedCache
from kvpress.policy import AttentionRequest, Policy


@dataclass
class GlobalMass(Policy):
    """Toy cross-layer policy: per row, rank the slots of every layer together by their accumulated
    attention (mean over KV heads) and keep the top `budget * layers`, wherever they are."""

    budget: int = 12
    allocates_across_layers = True

    def request(self, phase):
        return AttentionRequest(rows=None, accumulate=True)

    def score(self, layer):
        return self.raw_scores(layer)

    def allocate(self, layers):
        uniform = [self.keep_counts(layer)[:, 0] for layer in layers]  # [B] per layer
        total = torch.stack(uniform).sum(0)  # [B]
        pieces = [self.raw_scores(layer).mean(1).masked_fill(~layer.valid.any(1), -1.0) for layer in layers]
        ranked = torch.cat(pieces, dim=-1)  # [B, sum of slots]
        order = ranked.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
        chosen = (rank < total[:, None]).split([piece.shape[-1] for piece in pieces], dim=-1)
        return [c.sum(-1)[:, None].expand(-1, layer.num_heads) for c, layer in zip(chosen, layers)]


def model_with_different_layers():
    model = tiny_model("llama", "eager", num_hidden_layers=4)
    for scale, layer in zip((0.1, 3.0, 6.0, 1.0), model.model.layers):  # flat ... peaked attention
        layer.self_attn.q_proj.weight.data *= scale
    return model


@torch.no_grad()
def run(model, ids, cache, steps, **generate):
    if generate:
        return model.generate(ids, cache=cache, max_new_tokens=steps, do_sample=False, pad_token_id=0, **generate)
    sizes = []
    logits = model(ids, cache=cache).logits[:, -1]
    for _ in range(steps):
        logits = model(logits.argmax(-1, keepdim=True), cache=cache).logits[:, -1]
        sizes.append([int(layer.valid.sum(-1).max()) for layer in cache.layers])
    return sizes


def test_allocation_differs_by_layer_sums_to_the_uniform_total_and_decode_keeps_it():
    model, ids = model_with_different_layers(), random_ids(1, 48, seed=2)
    cache = PrunedCache(GlobalMass(budget=12))
    sizes = run(model, ids, cache, steps=6)
    chosen = sizes[0]
    assert len(set(chosen)) > 1, chosen
    assert sum(chosen) == 4 * 12
    assert all(step == chosen for step in sizes)  # decode evicts within each layer, at its size
    assert all(layer.evictions == 1 + 6 for layer in cache.layers)  # at the end of the prompt, then per step


def test_eviction_waits_for_the_end_of_the_prompt():
    model, ids = model_with_different_layers(), random_ids(1, 40, seed=3)
    cache = PrunedCache(GlobalMass(budget=10))
    with torch.no_grad():
        model(ids, cache=cache)
    assert [layer.num_slots for layer in cache.layers] == [40] * 4  # every layer attended, none compacted
    cache.end_prefill()
    assert sum(int(layer.valid.sum(-1).max()) for layer in cache.layers) == 40


def test_chunked_prefill_allocates_once_over_the_whole_prompt():
    model, ids = model_with_different_layers(), random_ids(1, 40, seed=4)
    whole, chunked = PrunedCache(GlobalMass(budget=10)), PrunedCache(GlobalMass(budget=10))
    out_whole = run(model, ids, whole, 3, attention_mask=torch.ones_like(ids))
    out_chunked = run(model, ids, chunked, 3, attention_mask=torch.ones_like(ids), prefill_chunk_size=12)
    assert torch.equal(out_whole, out_chunked)
    for a, b in zip(whole.layers, chunked.layers):
        assert torch.equal(a.positions[a.valid], b.positions[b.valid])
        assert a.evictions == b.evictions
