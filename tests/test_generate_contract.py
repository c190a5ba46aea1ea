"""The cache's contract with `generate`: chat continuation, chunked prefill after eviction, beam
search alignment, refused assisted decoding and cropping, bypass detection, clear errors."""

import pytest
import torch
from tiny_models import random_ids, tiny_model
from transformers import DynamicCache, FalconConfig, FalconForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvpress import PrunedCache
from kvpress.policies import H2O, Knorm, SnapKV


def test_continuation_feeds_only_new_tokens_and_matches_dynamic_cache_without_eviction():
    model = tiny_model("llama", "sdpa")
    first = random_ids(1, 20, seed=1)
    outputs = {}
    for name, cache in (("dynamic", DynamicCache()), ("pruned", PrunedCache(H2O(budget=1.0, window=0)))):
        out = model.generate(first, cache=cache, max_new_tokens=5, do_sample=False, pad_token_id=0)
        follow = torch.cat([out, random_ids(1, 6, seed=2)], dim=1)
        outputs[name] = model.generate(follow, cache=cache, max_new_tokens=5, do_sample=False, pad_token_id=0)
        # seen = 20 prompt + 4 fed back + 1 + 6 new + 4 fed back: only the new tokens were fed
        assert cache.get_seq_length() == 35
    assert torch.equal(outputs["dynamic"], outputs["pruned"])


def test_continuation_after_eviction_keeps_logical_length():
    model = tiny_model("llama", "sdpa")
    cache = PrunedCache(H2O(budget=12, window=4))
    out = model.generate(random_ids(1, 30), cache=cache, max_new_tokens=5, do_sample=False, pad_token_id=0)
    follow = torch.cat([out, random_ids(1, 4, seed=3)], dim=1)
    model.generate(follow, cache=cache, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert cache.get_seq_length() == follow.shape[1] + 2
    assert all(layer.kept_slots == 12 for layer in cache.layers)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_chunk_after_eviction_is_causal_among_new_tokens(attn):
    model = tiny_model("llama", attn)
    prompt, chunk = random_ids(1, 30, seed=4), random_ids(1, 3, seed=5)

    def prefilled():
        cache = PrunedCache(Knorm(budget=16), slack=8)  # evicts at prefill, not within the slack
        with torch.no_grad():
            model(prompt, cache=cache)
        assert cache.layers[0].kept_slots == 16
        return cache

    with torch.no_grad():
        together = model(chunk, cache=prefilled()).logits[0]
        cache = prefilled()
        one_by_one = torch.cat([model(chunk[:, i:i + 1], cache=cache).logits[0] for i in range(3)])
    assert torch.allclose(together, one_by_one, atol=1e-4)


def test_reorder_cache_keeps_every_per_slot_tensor_aligned():
    model = tiny_model("llama", "sdpa")
    cache = PrunedCache(H2O(budget=10, window=2))
    with torch.no_grad():
        model(random_ids(3, 16, seed=6), cache=cache)
    layer = cache.layers[1]
    before = {name: getattr(layer, name).clone() for name in ("keys", "values", "valid", "positions", "scores")}
    order = torch.tensor([2, 0, 0])
    cache.reorder_cache(order)
    for name, tensor in before.items():
        assert torch.equal(getattr(layer, name), tensor[order]), name


def test_beam_search_with_eviction_runs_and_holds_the_budget():
    model = tiny_model("llama", "eager")
    cache = PrunedCache(H2O(budget=12, window=3))
    out = model.generate(random_ids(2, 20), cache=cache, max_new_tokens=6, num_beams=3, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (2, 26)
    assert all(layer.keys.shape[:2] == (6, 2) and layer.kept_slots == 12 for layer in cache.layers)


@pytest.mark.parametrize("croppable", [False, True])
def test_assisted_decoding_is_refused(croppable, monkeypatch):
    """The cache declares itself not croppable, so transformers refuses assisted decoding up front; were
    that declaration bypassed, the library's own `crop` refuses when the draft is rolled back."""
    model = tiny_model("llama", "sdpa")
    cache = PrunedCache(H2O(budget=8, window=2))
    assert cache.is_croppable is False
    if croppable:
        monkeypatch.setattr(type(cache), "is_croppable", property(lambda self: True))
    message = r"crop\(-?\d+\): a PrunedCache cannot be cropped" if croppable else "requires a cache that can be cropped"
    with pytest.raises(ValueError, match=message):
        model.generate(random_ids(1, 10), cache=cache, assistant_model=tiny_model("llama", "sdpa", seed=1),
                       max_new_tokens=4, do_sample=False, pad_token_id=0)


def test_crop_is_refused_except_zero():
    model = tiny_model("llama", "sdpa")
    cache = PrunedCache(H2O(budget=8, window=2))
    with torch.no_grad():
        model(random_ids(1, 12), cache=cache)
    cache.crop(0)
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)


class AttentionCalledDirectly(torch.nn.Module):
    """A Llama attention that updates the cache and then calls SDPA itself, bypassing transformers'
    AttentionInterface (as Falcon did before transformers 5.25)."""

    def __init__(self, original):
        super().__init__()
        self.original = original

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        attn = self.original
        shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
        query = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        key, value = cache.update(key, value, attn.layer_idx)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
        return attn.o_proj(out.transpose(1, 2).flatten(2)), None


def test_model_bypassing_the_attention_interface_is_detected():
    model = tiny_model("llama", "sdpa")
    for decoder_layer in model.model.layers:
        decoder_layer.self_attn = AttentionCalledDirectly(decoder_layer.self_attn)
    ids = random_ids(1, 8)
    with torch.no_grad():
        model(ids, cache=DynamicCache())  # the stand-in model itself runs
        with pytest.raises(NotImplementedError, match="AttentionInterface.*Supported model families: llama"):
            model(ids, cache=PrunedCache(H2O(budget=4, window=1)))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_alibi_falcon_is_refused_with_the_reason(attn):
    config = FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True)
    config._attn_implementation = attn
    model = FalconForCausalLM(config).eval()
    refusal = r"ALiBi models \(config.alibi=True\).*Supported model families"
    with pytest.raises(NotImplementedError, match=refusal), torch.no_grad():
        model(random_ids(1, 8, vocab=64), cache=PrunedCache(H2O(budget=4, window=1)))


def test_unsupported_attention_implementation_is_named():
    model = tiny_model("llama", "sdpa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(NotImplementedError, match="flex_attention.*sdpa, eager, flash_attention_2"), torch.no_grad():
        model(random_ids(1, 8), cache=PrunedCache(H2O(budget=4, window=1)))


@pytest.mark.parametrize("make,message", [
    (lambda: H2O(budget=0), "budget must be >= 1"),
    (lambda: H2O(budget=-3), "budget must be >= 1"),
    (lambda: H2O(budget=1.5), r"float in \(0, 1\]|must lie in \(0, 1\]"),
    (lambda: H2O(budget=0.0), r"must lie in \(0, 1\]"),
    (lambda: H2O(budget="half"), "budget must be an int"),
    (lambda: H2O(budget=8, sinks=4, window=4), r"sinks \+ window \(4 \+ 4\) must be smaller than budget \(8\)"),
    (lambda: SnapKV(budget=64, kernel=4), "kernel must be an odd int"),
    (lambda: SnapKV(budget=64, pooling="mean"), "pooling must be 'max' or 'avg'"),
    (lambda: PrunedCache(H2O(), slack=-1), "slack must be an int >= 0"),
    (lambda: PrunedCache("h2o"), "policy must be a kvpress policy"),
])
def test_bad_input_names_the_argument_and_range(make, message):
    with pytest.raises(ValueError, match=message):
        make()
