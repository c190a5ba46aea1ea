"""The decoding step makes no device-to-host sync, for every registered policy at slack 0 and 16, on a
single row and on a padded batch, in full precision and with quantized storage (QuantizedPruning,
`PrunedCache(quantization=...)`); and the number of PyTorch ops per decoding step, printed against
DynamicCache's.
"""

import pytest
import torch
from registry_policies import generate, make_policy, prefill
from tiny_models import left_pad, random_ids, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from kvpress import KVQuant, PrunedCache
from kvpress.policies import REGISTRY, QuantizedPruning, SnapKV

SYNCS = {"_local_scalar_dense", "is_nonzero", "nonzero", "item"}
# LazyLLM is left out by design: how many stopped tokens a decoding step revives is data-dependent, so it
# reads counts on the host at its pruning layers (policies/lazyllm.py; tests/test_lazyllm.py covers it)
NAMES = sorted(name for name, cls in REGISTRY.items() if not getattr(cls, "runs_decoder_layers", False))


class OpCounter(TorchDispatchMode):
    """Counts every aten op, and the ones that copy a device value to the host."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func.overloadpacket.__name__
        if name in SYNCS:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", "eager")


@torch.no_grad()
def count_decode(model, cache, ids, mask, steps=6, warmup=2):
    """Prefill, `warmup` decoding steps (a cross-layer allocation runs at the first one), then count
    ops and syncs over `steps` decoding steps."""
    logits = prefill(model, ids, cache, attention_mask=mask)[:, -1]
    counter = OpCounter()
    for step in range(warmup + steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        token = logits.argmax(-1, keepdim=True)  # outside the counted region: generate's own sync
        if step == warmup:
            counter.__enter__()
        logits = model(token, attention_mask=mask, cache=cache).logits[:, -1]
    counter.__exit__(None, None, None)
    return counter


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("slack", [0, 16])
@pytest.mark.parametrize("padded", [False, True], ids=["single", "padded"])
def test_a_decoding_step_makes_no_host_sync(model, name, slack, padded):
    if padded:
        ids, mask = left_pad([random_ids(1, 40, seed=1)[0], random_ids(1, 29, seed=2)[0]])
    else:
        ids = random_ids(1, 40, seed=1)
        mask = torch.ones_like(ids)
    cache = PrunedCache(make_policy(name, 12), slack=slack)
    counter = count_decode(model, cache, ids, mask, steps=20)  # past a squeeze of holes too
    assert counter.syncs == [], f"{name}: {counter.syncs}"
    assert all(layer.evictions > 1 for layer in cache.layers)  # it did evict while decoding


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("slack", [0, 16])
@pytest.mark.parametrize("padded", [False, True], ids=["single", "padded"])
def test_a_decoding_step_on_quantized_storage_makes_no_host_sync(model, name, slack, padded):
    """Evictions drop slots in place; after the flush each region is cut to host-sized bounds, so
    decoding past flushes (a group of 8 fills every 8 steps) and block-table squeezes needs no sync."""
    if padded:
        ids, mask = left_pad([random_ids(1, 48, seed=5)[0], random_ids(1, 37, seed=6)[0]])
    else:
        ids = random_ids(1, 48, seed=5)
        mask = torch.ones_like(ids)
    quant = KVQuant(bits=4, group_size=8, residual=4)
    policy = make_policy(name, 24)
    if isinstance(policy, QuantizedPruning):  # memory for 24 slots per head at 4 bits (bytes_for_slots: 2,704)
        policy = QuantizedPruning(policy.inner, memory=2 * 2704, bits=4, per_layer=True, group_size=8)
    cache = PrunedCache(policy, slack=slack, quantization=quant)
    counter = count_decode(model, cache, ids, mask, steps=40)
    assert counter.syncs == [], f"{name}: {counter.syncs}"
    assert all(layer.store is not None and layer.store.quantized_slots >= 8 for layer in cache.layers)
    assert all(layer.evictions > 1 for layer in cache.layers)  # it did evict while decoding


def test_quantized_pruning_switching_precision_while_decoding_makes_no_host_sync(model):
    """QuantizedPruning's rule keeps a layer in full precision while its memory holds every token: here
    56 fp32 slots per head, so the 48-token prompt stays in full precision and a decoding step quantizes
    the layer (at 8 bits, the highest precision that holds the tokens then)."""
    ids, mask = left_pad([random_ids(1, 48, seed=5)[0], random_ids(1, 37, seed=6)[0]])
    memory = 2 * 56 * 2 * 16 * 4  # 2 KV heads x 56 slots x keys and values x head_dim 16 x fp32
    policy = QuantizedPruning(SnapKV(window=2), memory=memory, per_layer=True, group_size=8)
    cache = PrunedCache(policy)
    counter = count_decode(model, cache, ids, mask, steps=40)
    assert counter.syncs == [], counter.syncs
    assert all(layer.store is not None and layer.store.quant.bits == 8 for layer in cache.layers)


def test_ops_per_decoding_step_against_dynamic_cache(model, capsys):
    ids = random_ids(1, 40, seed=3)
    mask = torch.ones_like(ids)
    baseline = count_decode(model, DynamicCache(config=model.config), ids, mask).ops
    rows = []
    for name in ("h2o", "snapkv", "tova"):
        ops = count_decode(model, PrunedCache(make_policy(name, 12)), ids, mask).ops
        rows.append(f"{name}: {ops / 6:.0f} ops per decoding step, DynamicCache {baseline / 6:.0f} "
                    f"({ops / baseline:.2f}x)")
        assert ops > baseline  # eviction is work: a count below the baseline means nothing ran
    with capsys.disabled():
        print("\n" + "\n".join(rows))


@pytest.mark.parametrize("name", ["h2o", "a2sf"])  # H2O adds, A2SF decays then adds
def test_fused_decode_kernel_folds_the_score_the_cache_uses(model, name, monkeypatch):
    """On CUDA the decoding step's attention and score update are one kernel launch. Here the kernel
    runs in Triton's CPU interpreter; its tokens and running scores equal the unfused path's."""
    from kvpress import attention_path

    ids = random_ids(1, 30, seed=4)
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    plain = PrunedCache(make_policy(name, 12))
    reference = model.generate(ids, cache=plain, **settings)
    calls = []
    monkeypatch.setattr(attention_path, "fused_decode_fold", lambda query: calls.append(1) or True)
    monkeypatch.setattr(attention_path, "FUSED_DECODE_BACKEND", "triton")
    fused = PrunedCache(make_policy(name, 12))
    assert torch.equal(model.generate(ids, cache=fused, **settings), reference)
    assert calls  # the fused path ran
    for a, b in zip(plain.layers, fused.layers):
        torch.testing.assert_close(a.scores[a.valid], b.scores[b.valid], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["h2o", "knorm", "streamingllm", "random", "tova"])
def test_one_victim_per_step_equals_ranking_every_slot(model, name, monkeypatch):
    """At slack 0 a decoding step pushes a (row, head) at most one slot over its count, so the cache
    drops the `argmin` instead of ranking every slot; the kept slots must be the same."""
    ids, mask = left_pad([random_ids(1, 40, seed=1)[0], random_ids(1, 29, seed=2)[0]])
    settings = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    fast = PrunedCache(make_policy(name, 12))
    out_fast = generate(model, ids, fast, **settings)
    from kvpress import selection

    monkeypatch.setattr(selection, "drops_one_at_most", lambda policy, layer: False)
    ranked = PrunedCache(make_policy(name, 12))
    assert torch.equal(generate(model, ids, ranked, **settings), out_fast)
    for a, b in zip(fast.layers, ranked.layers):
        assert torch.equal(a.valid, b.valid) and torch.equal(a.positions[a.valid], b.positions[b.valid])
