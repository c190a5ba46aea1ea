"""Bad input tried as a new user would (issue 23; the table in docs/bad-input.md): prompts of 0 and 1
tokens, prompts shorter than sinks + window, budgets larger than the prompt, and wrong arguments to
`PrunedCache`, `KVQuant`, spec strings and the command line's numeric options."""

from __future__ import annotations

import pytest
import torch
from registry_policies import RECONSTRUCTION
from tiny_models import random_ids, tiny_model
from transformers import DynamicCache

from kvpress import KVQuant, PrunedCache, cli
from kvpress.policies import H2O, TOVA, Knorm, KVzip, PyramidKV, SnapKV, StreamingLLM
from kvpress.spec import build_cache, parse_spec

GREEDY = {"do_sample": False, "pad_token_id": 0}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", "sdpa")


def held_most(cache) -> int:
    return max(layer.kept_slots for layer in cache.pruned_layers())


# ---- prompts ----
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_empty_prompt_names_input_ids_and_leaves_the_cache_usable(attn):
    model = tiny_model("llama", attn)
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(RuntimeError):  # DynamicCache: a reshape error from the attention projection
        model.generate(empty, cache=DynamicCache(), max_new_tokens=3, **GREEDY)
    cache = PrunedCache(H2O(budget=8, window=2))
    with pytest.raises(ValueError, match=r"input_ids: .* at least one new token, got 0"):
        model.generate(empty, cache=cache, max_new_tokens=3, **GREEDY)
    ids = random_ids(1, 12)
    expected = model.generate(ids, cache=PrunedCache(H2O(budget=8, window=2)), max_new_tokens=5, **GREEDY)
    assert torch.equal(model.generate(ids, cache=cache, max_new_tokens=5, **GREEDY), expected)


@pytest.mark.parametrize("policy", [lambda: H2O(budget=8, window=2), lambda: KVzip(budget=8)], ids=["h2o", "kvzip"])
def test_prefill_of_an_empty_prompt_names_input_ids(llama, policy):
    with pytest.raises(ValueError, match=r"prefill: input_ids must be \[batch, tokens\] with at least one token, got "
                                         r"shape \(1, 0\)"):
        PrunedCache(policy()).prefill(llama, torch.zeros(1, 0, dtype=torch.long))


@pytest.mark.parametrize("policy", [lambda: H2O(budget=6, window=2), lambda: SnapKV(budget=6, window=2),
                                    lambda: StreamingLLM(budget=6, sinks=1, window=2), lambda: TOVA(budget=6),
                                    lambda: Knorm(budget=6), lambda: PyramidKV(SnapKV(budget=6, window=2))],
                         ids=["h2o", "snapkv", "streamingllm", "tova", "knorm", "pyramidkv"])
def test_one_token_prompt_equals_dynamic_cache_until_the_budget_then_holds_it(llama, policy):
    one = random_ids(1, 1, seed=3)
    reference = llama.generate(one, cache=DynamicCache(), max_new_tokens=14, **GREEDY)
    cache = PrunedCache(policy())
    out = llama.generate(one, cache=cache, max_new_tokens=14, **GREEDY)
    # the k-th new token is computed over 1 + k tokens: nothing is evicted before k = 6
    assert torch.equal(out[:, :7], reference[:, :7])
    assert cache.get_seq_length() == 14
    layers = cache.pruned_layers()
    assert sum(int(layer.valid.sum()) for layer in layers) <= 6 * len(layers) * layers[0].num_heads


def test_one_token_prompt_with_kvzip_is_prefilled_whole(llama):
    one = random_ids(1, 1, seed=3)
    cache = PrunedCache(KVzip(budget=5))
    logits = cache.prefill(llama, one, prompt=RECONSTRUCTION)
    with torch.no_grad():
        expected = llama(one, cache=DynamicCache()).logits
    assert torch.allclose(logits, expected, atol=1e-5)
    token = logits[:, -1].argmax(-1, keepdim=True)
    with torch.no_grad():
        for _ in range(6):
            token = llama(token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
    assert cache.get_seq_length() == 7 and held_most(cache) <= 5


@pytest.mark.parametrize("policy", [lambda: StreamingLLM(budget=16, sinks=4, window=8),
                                    lambda: H2O(budget=16, sinks=4, window=8), lambda: SnapKV(budget=16, window=8)],
                         ids=["streamingllm", "h2o", "snapkv"])
def test_prompt_shorter_than_sinks_plus_window(llama, policy):
    prompt = random_ids(1, 5, seed=6)
    reference = llama.generate(prompt, cache=DynamicCache(), max_new_tokens=20, **GREEDY)
    cache = PrunedCache(policy())
    out = llama.generate(prompt, cache=cache, max_new_tokens=20, **GREEDY)
    assert torch.equal(out[:, :17], reference[:, :17])  # 5 + 12 tokens seen: nothing evicted yet
    assert cache.get_seq_length() == 24
    sinks = getattr(cache.policy, "sinks", 0)
    for layer in cache.pruned_layers():
        for head in range(layer.num_heads):
            kept = set(layer.positions[0, head][layer.valid[0, head]].tolist())
            assert len(kept) == 16 and set(range(sinks)) | set(range(16, 24)) <= kept


@pytest.mark.parametrize("policy", [lambda: H2O(budget=64, window=2), lambda: SnapKV(budget=64, window=2),
                                    lambda: StreamingLLM(budget=64), lambda: TOVA(budget=1.0),
                                    lambda: Knorm(budget=64), lambda: PyramidKV(SnapKV(budget=64, window=2))],
                         ids=["h2o", "snapkv", "streamingllm", "tova-1.0", "knorm", "pyramidkv"])
def test_budget_larger_than_the_prompt_equals_dynamic_cache(llama, policy):
    ids = random_ids(2, 20, seed=7)
    reference = llama.generate(ids, cache=DynamicCache(), max_new_tokens=10, **GREEDY)
    cache = PrunedCache(policy())
    assert torch.equal(llama.generate(ids, cache=cache, max_new_tokens=10, **GREEDY), reference)
    assert held_most(cache) == 29 and all(layer.evictions == 0 for layer in cache.pruned_layers())


# ---- constructors ----
@pytest.mark.parametrize("make,message", [
    (lambda: PrunedCache(H2O), r"got the class H2O; build one: PrunedCache\(H2O\(\.\.\.\)\)"),
    (lambda: PrunedCache("h2o"), "policy must be a kvpress policy or None, got str"),
    (lambda: PrunedCache(H2O(), config="llama"), r"config must be the model's transformers config \(model.config\)"),
    (lambda: PrunedCache(H2O(), slack=True), "slack must be an int >= 0, got True"),
    (lambda: PrunedCache(H2O(), slack=1.5), "slack must be an int >= 0, got 1.5"),
    (lambda: PrunedCache(H2O(), quantization={"bits": 4}), "quantization must be a kvpress.KVQuant or None, got dict"),
    (lambda: PrunedCache(H2O(), quantization=4), "quantization must be a kvpress.KVQuant or None, got int"),
    (lambda: KVQuant(bits=4.0), r"bits must be one of \(2, 4, 8\), got 4.0"),
    (lambda: KVQuant(bits="4"), r"bits must be one of \(2, 4, 8\), got '4'"),
    (lambda: KVQuant(bits=3), r"bits must be one of \(2, 4, 8\), got 3"),
    (lambda: KVQuant(bits=True), r"bits must be one of \(2, 4, 8\), got True"),
    (lambda: KVQuant(group_size=0), "group_size must be an int >= 1 that divides head_dim, got 0"),
    (lambda: KVQuant(group_size=8.0), "group_size must be an int >= 1 that divides head_dim, got 8.0"),
    (lambda: KVQuant(residual=-1), r"residual must be an int >= 0 \(full-precision recent slots\), got -1"),
    (lambda: KVQuant(residual="4"), r"residual must be an int >= 0 \(full-precision recent slots\), got '4'"),
])
def test_constructor_arguments_of_the_wrong_type_name_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_positional_options_of_pruned_cache_are_refused():
    with pytest.raises(TypeError, match="positional"):
        PrunedCache(H2O(), None, 3)


def test_group_size_that_does_not_divide_head_dim_is_named_at_the_first_forward(llama):
    cache = PrunedCache(H2O(budget=8, window=2), quantization=KVQuant(group_size=5, residual=0))
    refusal = r"group_size must divide head_dim 16 .* accepted: \[1, 2, 4, 8, 16\]"
    with pytest.raises(ValueError, match=refusal), torch.no_grad():
        llama(random_ids(1, 40), cache=cache)


@pytest.mark.parametrize("spec,message", [
    ("h2o:budget=abc", r"H2O: budget must be an int >= 1 .* got 'abc'"),
    ("h2o:budget=true", r"H2O: budget must be an int >= 1 .* got True"),
    ("h2o:budget=1e3", r"H2O: a float budget .* must lie in \(0, 1\], got 1000.0"),
    ("snapkv:window=1.5", "SnapKV: window must be an int >= 0, got 1.5"),
    ("h2o+kvquant:bits=4.0", r"option 'kvquant' .* bits must be one of \(2, 4, 8\), got 4.0"),
    ("h2o+kvquant:group_size=abc", "option 'kvquant' .* group_size must be an int >= 1"),
    ("vatp()", "bad policy name ''"),
])
def test_spec_strings_with_wrong_values_name_the_argument(spec, message):
    with pytest.raises(ValueError, match=message):
        build_cache(parse_spec(spec))


@pytest.mark.parametrize("argv,message", [
    (["longbench", "--limit", "0"], "--limit must be an integer >= 1, got '0'"),
    (["longbench", "--limit", "abc"], "--limit must be an integer >= 1, got 'abc'"),
    (["longbench", "--max-length", "-5"], "--max-length must be an integer >= 1, got '-5'"),
    (["longbench", "--v2-max-length", "1.5"], "--v2-max-length must be an integer >= 1, got '1.5'"),
    (["longbench", "--workers", "0"], "--workers must be an integer >= 1, got '0'"),
    (["compare", "--limit", "-1"], "--limit must be an integer >= 1, got '-1'"),
    (["longbench", "--dtype", "int8"], "invalid choice: 'int8'"),
])
def test_numeric_command_line_options_name_the_option_and_the_range(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


pytestmark = pytest.mark.filterwarnings("ignore")


def test_prefill_options_of_kvzip_are_refused_by_other_policies_and_logits_to_keep_is_honoured(llama):
    ids = random_ids(1, 12)
    with pytest.raises(ValueError, match=r"prefill: context_start, prompt apply to a policy that owns its prefill"):
        PrunedCache(H2O(budget=8, window=2)).prefill(llama, ids, prompt=RECONSTRUCTION, context_start=2)
    with pytest.raises(ValueError, match=r"prefill: logits_to_keep must be an int >= 0, got -1"):
        PrunedCache(H2O(budget=8, window=2)).prefill(llama, ids, logits_to_keep=-1)
    full = PrunedCache(H2O(budget=8, window=2)).prefill(llama, ids)
    last = PrunedCache(H2O(budget=8, window=2)).prefill(llama, ids, logits_to_keep=1)
    assert full.shape[1] == 12 and last.shape[1] == 1
    torch.testing.assert_close(last[:, 0], full[:, -1])
