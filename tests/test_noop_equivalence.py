"""A policy that never evicts gives token-identical output to DynamicCache, on every family,
attention implementation and decoding strategy: through the pass-through path (no policy) and
through the library's own attention (a scoring policy whose budget is every token)."""

import pytest
import torch
from tiny_models import FAMILY_IMPL, random_ids, tiny_model
from transformers import DynamicCache

from kvpress import PrunedCache
from kvpress.policies import H2O, RandomPolicy

DECODING = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20, temperature=1.0),
    "beam": dict(do_sample=False, num_beams=3),
}


def generate(model, ids, cache, decoding):
    torch.manual_seed(1234)
    return model.generate(ids, max_new_tokens=8, cache=cache, pad_token_id=0, **DECODING[decoding])


@pytest.mark.parametrize("family,attn", FAMILY_IMPL)
@pytest.mark.parametrize("decoding", list(DECODING))
def test_never_evicting_policy_matches_dynamic_cache(family, attn, decoding):
    model = tiny_model(family, attn)
    ids = random_ids(2, 20)
    reference = generate(model, ids, DynamicCache(config=model.config), decoding)
    for policy in (None, RandomPolicy(budget=1.0), H2O(budget=1.0, window=0)):
        out = generate(model, ids, PrunedCache(policy), decoding)
        assert torch.equal(out, reference), f"{type(policy).__name__} differs from DynamicCache"


def test_pass_through_is_bit_identical():
    model = tiny_model("llama", "sdpa")
    ids = random_ids(1, 30)
    with torch.no_grad():
        ref = model(ids, cache=DynamicCache()).logits
        out = model(ids, cache=PrunedCache(None)).logits
    assert torch.equal(out, ref)


def test_own_attention_path_matches_logits_closely():
    model = tiny_model("llama", "eager")
    ids = random_ids(1, 30)
    with torch.no_grad():
        ref = model(ids, cache=DynamicCache()).logits
        out = model(ids, cache=PrunedCache(H2O(budget=1.0, window=0))).logits
    assert (out - ref).abs().max() < 1e-4


def test_ordinary_cache_is_untouched_by_the_hook():
    model = tiny_model("llama", "eager")
    ids = random_ids(1, 12)
    from kvpress import hook as attention

    with torch.no_grad():
        with_hook = model(ids, cache=DynamicCache()).logits
        attention.uninstall()
        try:
            without = model(ids, cache=DynamicCache()).logits
        finally:
            attention.install()
    assert torch.equal(with_hook, without)
