"""Left-padded batches give the same tokens as each prompt alone, with uniform budgets and with
budgets that differ per layer and per head (uniform budgets hide mask bugs: integration-notes.md
pitfall 9)."""

from dataclasses import dataclass

import pytest
import torch
from registry_policies import generate, make_policy
from tiny_models import FAMILIES, left_pad, random_ids, tiny_model

from kvpress import PrunedCache
from kvpress.policies import H2O, REGISTRY, TOVA, SnapKV, StreamingLLM


@dataclass
class RaggedH2O(H2O):
    """H2O whose budget shrinks with the layer index and the head index (test-only)."""

    def keep_counts(self, layer):
        counts = super().keep_counts(layer).clone()  # [B, Hkv]
        shrink = 3 * layer.layer_idx + 5 * torch.arange(layer.num_heads)
        return torch.minimum(counts, (self.budget - shrink).clamp(min=self.window + 1).expand_as(counts))


@dataclass
class RaggedH2OPerHead(RaggedH2O):
    """RaggedH2O with keys and values stored per head (kvpress/ragged.py)."""

    def per_head_storage(self, layer):
        return True


def run(model, ids, mask, policy, steps=10):
    cache = PrunedCache(policy)
    out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=steps, do_sample=False,
                         pad_token_id=0)
    return out[:, ids.shape[1]:], cache


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("policy", [H2O(budget=20, window=4), SnapKV(budget=20, window=4, kernel=3),
                                    TOVA(budget=20), StreamingLLM(budget=20, sinks=2),
                                    RaggedH2O(budget=24, window=4), RaggedH2OPerHead(budget=24, window=4),
                                    H2O(budget=0.5, window=4)],
                         ids=["h2o", "snapkv", "tova", "streaming", "ragged", "ragged-per-head", "h2o-float"])
def test_batch_equals_single_with_left_padding(attn, policy):
    model = tiny_model("llama", attn)
    rows = [random_ids(1, 41, seed=1)[0], random_ids(1, 27, seed=2)[0]]
    ids, mask = left_pad(rows)
    batched, _ = run(model, ids, mask, policy)
    for i, row in enumerate(rows):
        alone, _ = run(model, row[None], torch.ones(1, len(row), dtype=torch.long), policy)
        assert torch.equal(batched[i], alone[0]), f"row {i} differs from running it alone"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_policy_gives_each_row_what_it_gives_the_row_alone(name):
    model = tiny_model("llama", "eager")
    rows = [random_ids(1, 37, seed=3)[0], random_ids(1, 24, seed=4)[0]]
    ids, mask = left_pad(rows)
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    batched = generate(model, ids, PrunedCache(make_policy(name, 14)), attention_mask=mask, **settings)
    for i, row in enumerate(rows):
        alone = generate(model, row[None], PrunedCache(make_policy(name, 14)), **settings)
        assert torch.equal(batched[i, ids.shape[1]:], alone[0, len(row):]), f"{name}: row {i} differs from itself alone"


def test_ragged_budgets_leave_masked_holes():
    model = tiny_model("llama", "sdpa")
    _, cache = run(model, random_ids(1, 50), None, RaggedH2O(budget=24, window=4), steps=3)
    for layer in cache.layers:
        real = layer.valid[0].sum(-1)  # [Hkv]
        expected = (24 - 3 * layer.layer_idx - 5 * torch.arange(layer.num_heads)).clamp(min=5)
        assert torch.equal(real, expected)
        # prefill compacted to the largest count; each of the 3 decoding steps wrote one slot in place
        # and dropped the evicted one as a hole (squeezed out only when the storage fills)
        assert int(expected.max()) <= layer.num_slots <= int(expected.max()) + 3
    assert [row.kept for row in cache.report().layers] == [int(layer.valid[0].sum(-1).max()) for layer in cache.layers]


@pytest.mark.parametrize("family", [f for f in ("qwen2", "gemma3", "phi3", "falcon") if f in FAMILIES])
def test_batch_equals_single_on_other_families(family):
    model = tiny_model(family, "eager")
    rows = [random_ids(1, 33, seed=4)[0], random_ids(1, 19, seed=5)[0]]
    ids, mask = left_pad(rows)
    policy = RaggedH2OPerHead(budget=22, window=4)
    batched, _ = run(model, ids, mask, policy, steps=6)
    for i, row in enumerate(rows):
        alone, _ = run(model, row[None], None, policy, steps=6)
        assert torch.equal(batched[i], alone[0])
