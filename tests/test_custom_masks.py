"""A 4-D attention mask the caller builds (transformers passes it to the attention untouched) is honoured
or refused at every step, never ignored: at a decoding step, before any eviction, every registered
policy gives the logits `DynamicCache` gives under the same mask (or refuses); after an eviction the
mask's columns name tokens the cache no longer holds in order, and it is refused. transformers' own
masks (built from a 2-D padding mask and the cache's `get_mask_sizes`) are not affected."""

import pytest
import torch
from registry_policies import make_policy, prefill
from tiny_models import random_ids, tiny_model
from transformers import DynamicCache

from kvpress import PrunedCache
from kvpress.policies import REGISTRY

PROMPT = 20


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return tiny_model("llama", request.param)


def decode_mask(hidden: list[int], columns: int = PROMPT + 1) -> torch.Tensor:
    """`[1, 1, 1, columns]` additive (0 or the float minimum, as eager attention adds it): the new token
    sees every column but `hidden`."""
    mask = torch.zeros(1, 1, 1, columns)
    mask[..., hidden] = torch.finfo(mask.dtype).min
    return mask


HIDDEN = [0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 12, 14, 15, 17, 18]  # 15 of the 21 columns


def reference_logits(model, ids, token, mask):
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        return model(token, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_decoding_step_mask_is_honoured_before_eviction_or_refused(model, name):
    ids, token = random_ids(1, PROMPT, seed=11), random_ids(1, 1, seed=12)
    mask = decode_mask(HIDDEN)
    reference = reference_logits(model, ids, token, mask)
    with torch.no_grad():
        unmasked = reference_logits(model, ids, token, None)
    assert not torch.allclose(reference, unmasked, atol=1e-3)  # the mask matters
    cache = PrunedCache(make_policy(name, 64, never_evicts=True))
    with torch.no_grad():
        prefill(model, ids, cache)
        try:
            logits = model(token, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]
        except ValueError as refusal:
            assert "custom 4-D attention mask" in str(refusal), refusal
            assert name in REFUSED_BEFORE_EVICTION, f"{name} refused: {refusal}"
            return
    assert name not in REFUSED_BEFORE_EVICTION, f"{name} ran; the list says it refuses"
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


REFUSED_BEFORE_EVICTION: set[str] = set()


@pytest.mark.parametrize("name", ["h2o", "snapkv", "knorm", "streamingllm", "tova"])
def test_a_decoding_step_mask_after_an_eviction_is_refused(model, name):
    ids, token = random_ids(1, PROMPT, seed=11), random_ids(1, 1, seed=12)
    cache = PrunedCache(make_policy(name, 8))
    with torch.no_grad():
        prefill(model, ids, cache)
        assert cache.layers[0].kept_slots < PROMPT
        with pytest.raises(ValueError, match="custom 4-D attention mask .* after evicting"):
            model(token, attention_mask=decode_mask(HIDDEN), cache=cache, use_cache=True)


def test_a_mask_per_head_is_refused(model):
    ids, token = random_ids(1, PROMPT, seed=11), random_ids(1, 1, seed=12)
    heads = model.config.num_attention_heads
    cache = PrunedCache(make_policy("h2o", 64))
    with torch.no_grad():
        prefill(model, ids, cache)
        with pytest.raises(ValueError, match="mask per head"):
            model(token, attention_mask=decode_mask(HIDDEN).expand(1, heads, 1, -1), cache=cache, use_cache=True)


def test_transformers_own_padding_masks_still_run_after_eviction(model):
    """generate builds its masks from a 2-D padding mask through the cache's sizes: not a custom mask."""
    ids = random_ids(2, PROMPT, seed=13)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    cache = PrunedCache(make_policy("h2o", 8))
    out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, PROMPT + 5)
    assert cache.layers[0].kept_slots == 8
