"""Configurations that used to fail silently: models whose every layer slides, masks with structure
beyond causal order and padding, float64 on the model's device."""

import pytest
import torch
from tiny_models import left_pad, random_ids, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from kvpress import PrunedCache
from kvpress.policies import A2SF, H2O, AdaKV, Knorm, PyramidKV, QuantizedPruning, SnapKV, SpAtten

SLIDING = {  # every layer slides: the window is one more eviction rule of a pruned layer
    "mistral": {"sliding_window": 16},
    "qwen2": {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0},
    "phi3": {"sliding_window": 16},
}


@pytest.mark.parametrize("family", list(SLIDING))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_layer_sliding_is_pruned_and_holds_its_budget_at_every_step(family, attn):
    model = tiny_model(family, attn, **SLIDING[family])
    ids, mask = left_pad([random_ids(1, 40, seed=1)[0], random_ids(1, 33, seed=2)[0]])
    cache = PrunedCache(H2O(budget=8, window=2))
    sizes = []
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, cache=cache).logits[:, -1]
        for _ in range(10):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = model(logits.argmax(-1, keepdim=True), attention_mask=mask, cache=cache).logits[:, -1]
            sizes.append(max(int(layer.valid.sum(-1).max()) for layer in cache.layers))
            for layer in cache.layers:  # nothing older than the window stays, whatever its score
                oldest = layer.real_seen[:, None, None] - 15
                assert bool((layer.positions[layer.valid] >= oldest.expand_as(layer.positions)[layer.valid]).all())
    assert max(sizes) == 8


@pytest.mark.parametrize("family", list(SLIDING))
def test_a_budget_at_least_the_window_equals_transformers_sliding_layers(family):
    model = tiny_model(family, "sdpa", **SLIDING[family])
    ids = random_ids(1, 30, seed=3)
    settings = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    reference = model.generate(ids, cache=DynamicCache(config=model.config), **settings)
    for policy in (None, Knorm(budget=20), H2O(budget=24, window=2)):
        cache = PrunedCache(policy)
        assert torch.equal(model.generate(ids, cache=cache, **settings), reference), policy
        assert all(layer.kept_slots == 15 for layer in cache.layers)  # window - 1, as transformers keeps


def test_without_a_policy_a_sliding_layer_squeezes_its_holes():
    """The window's evictions leave holes; without a policy they were never squeezed, so storage grew
    with the sequence (capacity 121 after 110 tokens for a 16-token window)."""
    model = tiny_model("mistral", "sdpa", **SLIDING["mistral"])
    ids = random_ids(1, 30, seed=3)
    settings = {"max_new_tokens": 80, "do_sample": False, "pad_token_id": 0}
    reference = model.generate(ids, cache=DynamicCache(config=model.config), **settings)
    cache = PrunedCache(None)
    assert torch.equal(model.generate(ids, cache=cache, **settings), reference)
    for layer in cache.layers:
        assert layer.kept_slots == 15 and layer.slots.capacity <= 2 * 16, layer.slots.capacity


def test_the_reproduced_case_no_longer_keeps_42_slots():
    model = tiny_model("mistral", "eager", sliding_window=64)
    cache = PrunedCache(H2O(budget=8, window=2))
    model.generate(random_ids(1, 36, seed=4), cache=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert [layer.kept_slots for layer in cache.layers] == [8, 8, 8]


def bidirectional_prefix_mask(length: int, prefix: int) -> torch.Tensor:
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    allowed[:prefix, :prefix] = True
    return allowed[None, None]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_mask_with_structure_is_honoured_or_refused(attn):
    model = tiny_model("llama", attn)
    ids, mask = random_ids(1, 20, seed=5), bidirectional_prefix_mask(20, 8)
    with torch.no_grad():
        reference = model(ids, attention_mask=mask, cache=DynamicCache()).logits
        causal = model(ids, cache=DynamicCache()).logits
        assert not torch.allclose(reference, causal)  # the mask matters
        for policy in (None, Knorm(budget=8)):  # the model's own attention honours it
            assert torch.equal(model(ids, attention_mask=mask, cache=PrunedCache(policy)).logits, reference)
        with pytest.raises(ValueError, match="structure beyond causal order and padding"):
            model(ids, attention_mask=mask, cache=PrunedCache(H2O(budget=8, window=2)))


class Float64Watch(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64:
                self.seen.append(func.__name__)
        return out


def test_no_float64_tensor_is_created():
    model = tiny_model("llama", "eager", num_hidden_layers=4)
    ids, mask = left_pad([random_ids(1, 40, seed=6)[0], random_ids(1, 31, seed=7)[0]])
    policies = [H2O(budget=0.3, window=2), A2SF(budget=12, window=2), PyramidKV(SnapKV(budget=12, window=2)),
                AdaKV(SnapKV(budget=0.4, window=2)), SpAtten(budget=0.5, window=2),
                QuantizedPruning(SnapKV(window=2), memory=20_000, per_layer=True, group_size=8)]
    for policy in policies:
        watch = Float64Watch()
        with watch:
            model.generate(ids, attention_mask=mask, cache=PrunedCache(policy), max_new_tokens=4, do_sample=False,
                           pad_token_id=0)
        assert not watch.seen, f"{type(policy).__name__}: float64 from {sorted(set(watch.seen))}"
