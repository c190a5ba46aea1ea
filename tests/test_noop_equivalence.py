"""A policy that never evicts gives token-identical output to DynamicCache, on every family,
attention implementation and decoding strategy: through the pass-through path (no policy), through
the library's own attention (H2O, which needs every row's attention, whose budget is every token) and
through the model's attention plus recomputed window rows (SnapKV). The test counts the calls of the
library's own attention, so that it cannot pass through the model's path alone."""

import pytest
import torch
from tiny_models import FAMILY_IMPL, random_ids, tiny_model
from transformers import DynamicCache

from kvpress import PrunedCache, attention_path
from kvpress.policies import H2O, RandomPolicy, SnapKV

DECODING = {
    "greedy": {"do_sample": False},
    "sampling": {"do_sample": True, "top_k": 20, "temperature": 1.0},
    "beam": {"do_sample": False, "num_beams": 3},
}


def generate(model, ids, cache, decoding):
    torch.manual_seed(1234)
    return model.generate(ids, max_new_tokens=8, cache=cache, pad_token_id=0, **DECODING[decoding])


@pytest.mark.parametrize("family,attn", FAMILY_IMPL)
@pytest.mark.parametrize("decoding", list(DECODING))
def test_never_evicting_policy_matches_dynamic_cache(family, attn, decoding, monkeypatch):
    model = tiny_model(family, attn)
    ids = random_ids(2, 20)
    reference = generate(model, ids, DynamicCache(config=model.config), decoding)
    calls = []
    grouped = attention_path.grouped_attention  # the library's own attention, as the path calls it
    monkeypatch.setattr(attention_path, "grouped_attention",
                        lambda *args, **kwargs: calls.append(args[0].shape[2]) or grouped(*args, **kwargs))
    for policy, own_path in ((None, False), (RandomPolicy(budget=1.0), False), (H2O(budget=1.0, window=0), True),
                             (SnapKV(budget=1.0, window=4), True)):
        calls.clear()
        out = generate(model, ids, PrunedCache(policy), decoding)
        assert torch.equal(out, reference), f"{type(policy).__name__} differs from DynamicCache"
        assert bool(calls) == own_path, f"{type(policy).__name__}: library attention called {len(calls)} times"


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
