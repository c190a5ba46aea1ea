"""Behaviour users rely on that no other test covered (issue 23): half precision end to end, device
moves, batch selection, deep copies, chunked prefill (SnapKV, quantized storage, KVzip), `generate()`
after `cache.prefill`, a second turn after eviction for every registered policy, sampling with
eviction, and the refusals of training mode, non-causal attention and attention sinks.

References are computed without the code under test where one exists: transformers' `DynamicCache`
(no eviction), the same row run alone, an uncopied run, a tensor walk over the cache's objects
written here, and layer 0's keys (they depend on nothing but the token and its position)."""

from __future__ import annotations

import copy

import pytest
import torch
from registry_policies import RECONSTRUCTION, generate, make_policy
from tiny_models import random_ids, tiny_model
from transformers import DynamicCache

from kvpress import KVQuant, PrunedCache
from kvpress.policies import H2O, REGISTRY, KVzip, PyramidKV, SnapKV, SpAtten

GREEDY = {"do_sample": False, "pad_token_id": 0}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", "sdpa")


def held_per_row(cache) -> torch.Tensor:
    """`[B]` valid slots per KV head, averaged over the pruned layers and heads (per-layer and per-head
    policies move slots around, never add)."""
    layers = cache.pruned_layers()
    held = sum(layer.valid.sum(dim=(-1, -2)) for layer in layers).float()
    return held / (len(layers) * layers[0].num_heads)


def tensors_in(obj, path="cache", seen=None) -> dict[str, torch.Tensor]:
    """Every tensor reachable from `obj` through attributes, lists, tuples and dicts, by path; policies
    (pure descriptions) and modules are not entered. Written here, independent of `map_tensors`."""
    seen = set() if seen is None else seen
    found = {}
    if isinstance(obj, torch.Tensor):
        return {path: obj}
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
        return found
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    elif type(obj).__module__.split(".")[0] in ("kvpress", "policies", "transformers") and hasattr(obj, "__dict__"):
        if type(obj).__name__ == "LayerContext":  # the policy and the cache's shared state, walked from the cache
            return found
        from kvpress.policy import EvictionPolicy
        if isinstance(obj, EvictionPolicy):
            return found
        items = [(f"{path}.{k}", v) for k, v in vars(obj).items()]
    else:
        return found
    for name, value in items:
        found.update(tensors_in(value, name, seen))
    return found


# ---- half precision ----
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_noop_equals_dynamic_cache_and_pruning_holds_the_budget(dtype):
    model = tiny_model("llama", "sdpa").to(dtype)
    ids = random_ids(1, 30)
    reference = model.generate(ids, cache=DynamicCache(), max_new_tokens=8, **GREEDY)
    assert torch.equal(model.generate(ids, cache=PrunedCache(None), max_new_tokens=8, **GREEDY), reference)
    # a pruning policy whose budget holds the whole run evicts nothing: DynamicCache's tokens in that dtype
    assert torch.equal(model.generate(ids, cache=PrunedCache(SnapKV(budget=64, window=2)), max_new_tokens=8,
                                      **GREEDY), reference)
    for policy, quantization in ((SnapKV(budget=12, window=2), None), (H2O(budget=12, window=2), None),
                                 (SnapKV(budget=12, window=2), KVQuant(bits=4, group_size=8, residual=4))):
        cache = PrunedCache(policy, quantization=quantization)
        out = model.generate(ids, cache=cache, max_new_tokens=8, **GREEDY)
        assert out.shape == (1, 38)
        assert all(layer.kept_slots <= 12 for layer in cache.layers)
        assert all(layer.dtype == dtype for layer in cache.layers)
        with torch.no_grad():  # the pruned cache's next logits are finite in that dtype
            assert torch.isfinite(model(out[:, -1:], cache=cache).logits).all()


# ---- device moves ----
@pytest.mark.parametrize("family,attn,policy", [
    ("llama", "sdpa", lambda: SpAtten(budget=10, window=2)),  # cross-layer state
    ("llama", "sdpa", lambda: PyramidKV(SnapKV(budget=10, window=2))),  # allocations
    ("llama", "sdpa", lambda: H2O(budget=10, window=2)),
    ("gemma2", "eager", lambda: H2O(budget=10, window=2)),  # transformers' own sliding layers too
])
def test_to_moves_every_tensor_the_cache_holds(family, attn, policy):
    model = tiny_model(family, attn)
    cache = PrunedCache(policy())
    model.generate(random_ids(1, 20), cache=cache, max_new_tokens=3, **GREEDY)
    before = tensors_in(cache)
    assert len(before) > 10 and all(t.device.type == "cpu" for t in before.values())
    assert cache.to(torch.device("meta")) is cache
    after = tensors_in(cache)
    assert set(after) == set(before)
    assert [name for name, t in after.items() if t.device.type != "meta"] == []


def test_to_the_same_device_keeps_a_working_cache(llama):
    ids = random_ids(1, 24)
    reference = llama.generate(ids, cache=PrunedCache(H2O(budget=10, window=2)), max_new_tokens=8, **GREEDY)
    cache = PrunedCache(H2O(budget=10, window=2))
    first = llama.generate(ids, cache=cache, max_new_tokens=4, **GREEDY)
    assert cache.to("cpu") is cache
    assert torch.equal(llama.generate(first, cache=cache, max_new_tokens=4, **GREEDY), reference)


# ---- batch selection and deep copies ----
def greedy_steps(model, cache, last: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` greedy tokens `[B, steps]` after `last [B, 1]`, fed one at a time."""
    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            last = model(last, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(last)
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("policy", [lambda: H2O(budget=10, window=2), lambda: SpAtten(budget=10, window=2),
                                    lambda: PyramidKV(SnapKV(budget=10, window=2))],
                         ids=["h2o", "spatten", "pyramidkv"])
def test_batch_select_indices_row_equals_that_row_run_alone(llama, policy):
    ids = random_ids(3, 20, seed=4)
    cache = PrunedCache(policy())
    with torch.no_grad():
        logits = llama(ids, cache=cache, use_cache=True).logits[:, -1:]
    head = greedy_steps(llama, cache, logits.argmax(-1), 3)  # every row evicts while decoding
    cache.batch_select_indices(torch.tensor([2, 0]))
    tail = greedy_steps(llama, cache, head[[2, 0], -1:], 6)
    for selected, row in enumerate((2, 0)):
        alone = PrunedCache(policy())
        with torch.no_grad():
            logits = llama(ids[row:row + 1], cache=alone, use_cache=True).logits[:, -1:]
        expected = greedy_steps(llama, alone, logits.argmax(-1), 9)
        assert torch.equal(torch.cat([head[row], tail[selected]]), expected[0]), f"row {row}"
        assert all(torch.equal(a.valid[selected], b.valid[0]) and torch.equal(a.positions[selected], b.positions[0])
                   for a, b in zip(cache.pruned_layers(), alone.pruned_layers()))


@pytest.mark.parametrize("policy", [lambda: H2O(budget=10, window=2), lambda: SpAtten(budget=10, window=2),
                                    lambda: SnapKV(budget=10, window=2)], ids=["h2o", "spatten", "snapkv"])
def test_deepcopy_is_independent_of_the_original(llama, policy):
    ids = random_ids(1, 20, seed=5)
    uncopied = PrunedCache(policy())
    expected = llama.generate(ids, cache=uncopied, max_new_tokens=10, **GREEDY)
    original = PrunedCache(policy())
    first = llama.generate(ids, cache=original, max_new_tokens=4, **GREEDY)
    snapshot = {name: t.clone() for name, t in tensors_in(original).items()}
    duplicate = copy.deepcopy(original)
    assert torch.equal(llama.generate(first, cache=duplicate, max_new_tokens=6, **GREEDY), expected)
    now = tensors_in(original)
    assert set(now) == set(snapshot)
    changed = [name for name, t in now.items() if t.shape != snapshot[name].shape or not torch.equal(t, snapshot[name])]
    assert changed == []
    assert original.get_seq_length() == 23
    assert torch.equal(llama.generate(first, cache=original, max_new_tokens=6, **GREEDY), expected)


# ---- chunked prefill ----
def budget_at_every_forward(model, cache, budget: int):
    """A forward hook asserting that no row holds more than `budget` slots per head after any forward."""
    def check(*_):
        if cache.pruned_layers() and cache.pruned_layers()[0].is_initialized:
            assert float(held_per_row(cache).max()) <= budget
    return model.register_forward_hook(check)


def test_chunked_prefill_snapkv_holds_the_budget_and_keeps_the_last_window(llama):
    ids = random_ids(1, 30)
    cache = PrunedCache(SnapKV(budget=12, window=3))
    handle = budget_at_every_forward(llama, cache, 12)
    try:
        out = llama.generate(ids, cache=cache, max_new_tokens=5, prefill_chunk_size=8, **GREEDY)
    finally:
        handle.remove()
    assert out.shape == (1, 35) and cache.get_seq_length() == 34
    for layer in cache.pruned_layers():
        for head in range(layer.num_heads):  # 12 distinct tokens, the newest window among them
            kept = layer.positions[0, head][layer.valid[0, head]].tolist()
            assert len(kept) == len(set(kept)) == 12 and all(0 <= p <= 33 for p in kept)
            assert {31, 32, 33} <= set(kept)
    # without eviction a chunked prefill gives DynamicCache's tokens
    reference = llama.generate(ids, cache=DynamicCache(), max_new_tokens=5, **GREEDY)
    chunked = llama.generate(ids, cache=PrunedCache(SnapKV(budget=64, window=3)), max_new_tokens=5,
                             prefill_chunk_size=8, **GREEDY)
    assert torch.equal(chunked, reference)


@pytest.mark.parametrize("bits", [4, 8])
def test_chunked_prefill_with_quantized_storage_keeps_each_key_within_its_quantization_error(llama, bits):
    ids = random_ids(1, 30)
    quant = KVQuant(bits=bits, group_size=8, residual=4)
    cache = PrunedCache(SnapKV(budget=14, window=2), quantization=quant)
    handle = budget_at_every_forward(llama, cache, 14)
    try:
        llama.generate(ids, cache=cache, max_new_tokens=5, prefill_chunk_size=8, **GREEDY)
    finally:
        handle.remove()
    truth = DynamicCache()
    with torch.no_grad():
        llama(torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1), cache=truth)  # layer 0's keys: per token
    layer = cache.pruned_layers()[0]
    assert layer.store is not None and layer.store.quantized_slots > 0
    true_keys = truth.layers[0].keys[0]  # [Hkv, T, D]
    # a key group spans at most the channel's whole range over the prompt: error <= range / levels / 2
    step = (true_keys[:, :30].amax(1) - true_keys[:, :30].amin(1)) / quant.levels  # [Hkv, D]
    with layer.slots.readable():
        keys, valid, positions = layer.keys[0], layer.valid[0], layer.positions[0]
        for head in range(layer.num_heads):
            stored = keys[head][valid[head]]
            expected = true_keys[head, positions[head][valid[head]]]
            prompt = positions[head][valid[head]] < 30  # decoded tokens' keys depend on what was generated
            error = (stored - expected)[prompt].abs()
            assert (error <= step[head] / 2 + 1e-5).all(), float((error - step[head] / 2).max())


def test_kvzip_refuses_a_chunked_prefill_through_generate_and_chunks_its_own_reconstruction(llama):
    ids = random_ids(1, 30)
    with pytest.raises(ValueError, match=r"cache\.prefill\(model, input_ids, tokenizer=tokenizer\)"):
        llama.generate(ids, cache=PrunedCache(KVzip(budget=12)), max_new_tokens=3, prefill_chunk_size=8, **GREEDY)
    # KVzip's own chunking is its reconstruction's `chunk_size`; generate(prefill_chunk_size=) after
    # cache.prefill has one token left to feed and gives what plain generate gives
    outputs = []
    for chunk in (None, 8):
        cache = PrunedCache(KVzip(budget=12, chunk_size=8, overlap=2))
        cache.prefill(llama, ids[:, :-1], prompt=RECONSTRUCTION)
        extra = {} if chunk is None else {"prefill_chunk_size": chunk}
        outputs.append(llama.generate(ids, cache=cache, max_new_tokens=5, **GREEDY, **extra))
        assert float(held_per_row(cache).max()) <= 12
    assert torch.equal(*outputs)


# ---- KVzip: generate after cache.prefill ----
def test_generate_after_kvzip_prefill_continues_at_the_right_positions(llama):
    ids = random_ids(1, 30, seed=7)
    # nothing evicted: DynamicCache's tokens
    cache = PrunedCache(KVzip(budget=64))
    cache.prefill(llama, ids[:, :-1], prompt=RECONSTRUCTION)
    reference = llama.generate(ids, cache=DynamicCache(), max_new_tokens=6, **GREEDY)
    assert torch.equal(llama.generate(ids, cache=cache, max_new_tokens=6, **GREEDY), reference)
    # evicted: generate equals a loop that feeds each token with its position given explicitly
    cache = PrunedCache(KVzip(budget=10))
    cache.prefill(llama, ids[:, :-1], prompt=RECONSTRUCTION)
    twin = copy.deepcopy(cache)
    out = llama.generate(ids, cache=cache, max_new_tokens=6, **GREEDY)
    last, tokens = ids[:, -1:], []
    with torch.no_grad():
        for step in range(6):
            position = torch.tensor([[29 + step]])
            logits = llama(last, cache=twin, position_ids=position, cache_position=position[0]).logits
            last = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(last)
    assert torch.equal(out[:, 30:], torch.cat(tokens, 1))
    assert cache.get_seq_length() == 35 and float(held_per_row(cache).max()) <= 10


# ---- a second turn after eviction, every registered policy ----
def chain_window(policy) -> int:
    return max((getattr(member, "window", 0) or 0 for member in policy.chain()), default=0)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_second_turn_after_eviction(llama, name):
    first, more = random_ids(1, 30, seed=1), random_ids(1, 6, seed=2)
    policy = make_policy(name, 10)
    cache = PrunedCache(policy)
    out = generate(llama, first, cache, max_new_tokens=5, **GREEDY)
    out = llama.generate(torch.cat([out, more], 1), cache=cache, max_new_tokens=5, **GREEDY)
    assert out.shape == (1, 46) and cache.get_seq_length() == 45
    if not policy.runs_decoder_layers and not any(member.sets_storage for member in policy.chain()):
        assert float(held_per_row(cache).max()) <= 10
    window = chain_window(policy)
    for layer in cache.pruned_layers():
        for head in range(layer.num_heads):
            kept = layer.positions[0, head][layer.valid[0, head]].tolist()
            assert len(kept) == len(set(kept)) and all(0 <= p < 45 for p in kept)
            if kept and window:  # a head SpAtten switched off keeps nothing
                assert set(range(45 - window, 45)) <= set(kept)
    # a budget that holds both turns evicts nothing: DynamicCache's tokens
    cache, dynamic = PrunedCache(make_policy(name, 200, never_evicts=True)), DynamicCache()
    turns = []
    for current in (cache, dynamic):
        out = generate(llama, first, current, max_new_tokens=5, **GREEDY)
        turns.append(llama.generate(torch.cat([out, more], 1), cache=current, max_new_tokens=5, **GREEDY))
    assert torch.equal(*turns)


# ---- sampling ----
SAMPLING = {"do_sample": True, "top_k": 20, "temperature": 1.5, "pad_token_id": 0}


def test_sampling_without_eviction_equals_dynamic_cache_under_the_same_seed(llama):
    ids = random_ids(2, 20, seed=8)
    runs = []
    for cache in (DynamicCache(), PrunedCache(None), PrunedCache(H2O(budget=64, window=2))):
        torch.manual_seed(11)
        runs.append(llama.generate(ids, cache=cache, max_new_tokens=10, **SAMPLING))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    torch.manual_seed(12)
    assert not torch.equal(llama.generate(ids, cache=DynamicCache(), max_new_tokens=10, **SAMPLING), runs[0])


def test_sampling_with_eviction_draws_from_the_pruned_cache_logits(llama):
    ids = random_ids(2, 20, seed=8)
    runs = []
    for _ in range(2):
        cache = PrunedCache(H2O(budget=10, window=2))
        torch.manual_seed(11)
        runs.append(llama.generate(ids, cache=cache, max_new_tokens=10, **SAMPLING))
        assert float(held_per_row(cache).max()) <= 10
    assert torch.equal(*runs)
    # reference: the pruned cache's logits, each token fed at its position given explicitly, then top-k,
    # temperature and multinomial written here
    cache = PrunedCache(H2O(budget=10, window=2))
    torch.manual_seed(11)
    tokens, feed, positions = [], ids, torch.arange(20)
    with torch.no_grad():
        for step in range(10):
            scores = llama(feed, cache=cache, position_ids=positions[None].expand(2, -1), cache_position=positions,
                           use_cache=True).logits[:, -1].float() / 1.5
            positions = torch.tensor([20 + step])
            kth = scores.topk(20, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
            feed = torch.multinomial(scores.softmax(-1), 1)
            tokens.append(feed)
    assert torch.equal(runs[0][:, 20:], torch.cat(tokens, 1))


# ---- refusals ----
def forward(model, cache, **kwargs):
    with torch.no_grad():
        model(random_ids(1, 10), cache=cache, **kwargs)


def test_training_mode_is_refused():
    model = tiny_model("llama", "sdpa").train()
    with pytest.raises(NotImplementedError, match=r"PrunedCache is for inference: call model\.eval\(\)"):
        forward(model, PrunedCache(H2O(budget=4, window=1)))
    model.eval()
    forward(model, PrunedCache(H2O(budget=4, window=1)))  # the same model, back in eval mode, runs


def test_non_causal_attention_is_refused():
    model = tiny_model("llama", "sdpa")
    for decoder_layer in model.model.layers:
        decoder_layer.self_attn.is_causal = False
    with pytest.raises(NotImplementedError, match="causal decoder attention only"):
        forward(model, PrunedCache(H2O(budget=4, window=1)))


@pytest.mark.parametrize("argument", ["s_aux", "position_bias"])
def test_attention_sinks_and_position_bias_are_refused(llama, argument):
    # transformers hands extra forward kwargs to the attention function (as gpt-oss passes its sinks)
    with pytest.raises(NotImplementedError, match="Attention sinks / position biases are not supported"):
        forward(llama, PrunedCache(H2O(budget=4, window=1)), **{argument: torch.zeros(4)})


pytestmark = pytest.mark.filterwarnings("ignore")
