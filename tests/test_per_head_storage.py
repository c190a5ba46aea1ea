"""Per-head storage (kvpress/ragged.py): layers whose KV heads keep different numbers of slots (AdaKV,
SpAtten's switched-off heads, KVCompose unstructured) hold bytes in proportion to the slots kept, and
compute exactly what the padded `[B, Hkv, P, D]` layout computes.

The reference is the padded layout itself (the policy's `per_head_storage` switched off): same tokens,
same slots kept, the same keys and values in them (to fp32 rounding: the per-head layout orders each
head's surplus slots last, which changes the order of the zero terms attention sums). Bytes are checked against the storages of the tensors
the layer really holds, found by walking them, and against the valid slots counted from `valid`.
"""

import pytest
import torch
from tiny_models import left_pad, random_ids, tiny_model

from kvpress import PrunedCache, PrunedLayer
from kvpress.policies import H2O, AdaKV, KVCompose, PyramidKV, SnapKV, SpAtten
from kvpress.policy import EvictionPolicy, Wrapper


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", "eager", num_key_value_heads=4, num_attention_heads=8)


POLICIES = {
    "adakv": lambda: AdaKV(SnapKV(budget=16, window=2, kernel=3)),
    "adakv-float": lambda: AdaKV(SnapKV(budget=0.3, window=2, kernel=3)),
    "adakv-pyramid": lambda: AdaKV(PyramidKV(SnapKV(budget=16, window=2, kernel=3))),
    "spatten": lambda: SpAtten(budget=16, window=4, head_keep=0.5),
    "kvcompose-unstructured": lambda: KVCompose(budget=16, window=4, structured=False),
}


def padded_layout(monkeypatch):
    """Every policy stores keys and values padded to the head that keeps most (the reference)."""
    for cls in (EvictionPolicy, Wrapper, AdaKV, SpAtten, KVCompose):
        monkeypatch.setattr(cls, "per_head_storage", lambda self, layer: False)


def run(model, policy, slack, steps=24, beams=1):
    ids, mask = left_pad([random_ids(1, 60, seed=1)[0], random_ids(1, 41, seed=2)[0]])
    cache = PrunedCache(policy, slack=slack)
    out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=steps, do_sample=False,
                         pad_token_id=0, num_beams=beams)
    return out, cache


def held_slots(layer: PrunedLayer):
    """Per (row, head): positions, keys and values of the valid slots, in slot order."""
    valid = layer.valid
    return [(layer.positions[b, h][valid[b, h]], layer.keys[b, h][valid[b, h]], layer.values[b, h][valid[b, h]])
            for b in range(valid.shape[0]) for h in range(valid.shape[1])]


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("slack", [0, 5])
def test_per_head_storage_computes_what_the_padded_layout_computes(model, name, slack, monkeypatch):
    out, cache = run(model, POLICIES[name](), slack)  # 24 steps: several re-layouts while decoding
    assert any(layer.slots.ragged is not None for layer in cache.layers)
    with monkeypatch.context() as patch:
        padded_layout(patch)
        reference_out, reference = run(model, POLICIES[name](), slack)
    assert all(layer.slots.ragged is None for layer in reference.layers)
    assert torch.equal(out, reference_out)
    for ours, theirs in zip(cache.layers, reference.layers):
        for (p, k, v), (rp, rk, rv) in zip(held_slots(ours), held_slots(theirs)):
            assert torch.equal(p, rp)
            torch.testing.assert_close(k, rk, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-6)


def test_beam_search_over_per_head_storage_matches_the_padded_layout(model, monkeypatch):
    out, cache = run(model, AdaKV(SnapKV(budget=16, window=2)), 0, steps=10, beams=3)
    with monkeypatch.context() as patch:
        padded_layout(patch)
        reference_out, _ = run(model, AdaKV(SnapKV(budget=16, window=2)), 0, steps=10, beams=3)
    assert torch.equal(out, reference_out)
    assert all(layer.slots.ragged is not None and layer.batch == 6 for layer in cache.layers)


def kv_bytes_of_valid_slots(layer: PrunedLayer) -> int:
    per_slot = layer.keys[0, 0, 0].nbytes + layer.values[0, 0, 0].nbytes
    return int(layer.valid.sum()) * per_slot


def test_adakv_allocates_bytes_in_proportion_to_the_slots_kept(model):
    """The heads of a layer keep different counts; the padded layout allocated ~1.4-1.9x the valid
    slots. Per head: the slots kept plus 1/16 of the budget of room per head, and one trash row."""
    ids = random_ids(1, 600, seed=3)
    cache = PrunedCache(AdaKV(SnapKV(budget=0.3, window=4)))
    model.generate(ids, cache=cache, max_new_tokens=8, do_sample=False, pad_token_id=0)
    counts = torch.stack([layer.valid.sum(-1) for layer in cache.layers])  # [L, B, Hkv]
    assert bool((counts.amax(-1) > 1.2 * counts.amin(-1)).any())  # the heads do keep different counts
    for layer in cache.layers:
        assert layer.slots.kv_nbytes <= 1.1 * kv_bytes_of_valid_slots(layer)
        padded = layer.num_heads * layer.num_slots * (layer.keys[0, 0, 0].nbytes + layer.values[0, 0, 0].nbytes)
        assert layer.slots.kv_nbytes < padded


def test_switched_off_heads_hold_and_receive_no_storage(model):
    cache = PrunedCache(SpAtten(budget=24, window=4, head_keep=0.25))
    ids = random_ids(1, 80, seed=4)
    with torch.no_grad():
        logits = model(ids, cache=cache).logits
    last = cache.layers[-1]
    off = last.slots.heads_off[0]  # [Hkv]
    assert bool(off.any())
    store = last.slots.ragged
    live = int((~off).sum())
    assert not bool(store.live[0][off].any()) and bool((store.front[0][off] == 0).all())
    # sized at prefill from the counts kept: the live heads' slots and room, and the trash row
    assert store.keys.shape[1] == int(store.front.sum()) + live * store.room + 1
    with torch.no_grad():
        for _ in range(12):  # decoding re-lays the storage out, sized by host-side bounds
            logits = model(logits[:, -1:].argmax(-1), cache=cache).logits
    store = last.slots.ragged
    assert not bool(store.live[0][off].any()) and not bool(last.valid[0][off].any())
    assert store.keys.shape[1] <= live * store.capacity + 1 < last.num_heads * store.capacity


def storage_bytes(layer: PrunedLayer) -> int:
    """Bytes of the distinct storages behind every tensor the layer holds, found by walking its slots,
    its metadata, its per-head store and its policy states."""
    tensors = [t for t in vars(layer.slots).values() if isinstance(t, torch.Tensor)]
    tensors += [t for t in vars(layer.slots.meta).values() if isinstance(t, torch.Tensor)]
    tensors += [t for t in vars(layer.slots.ragged).values() if isinstance(t, torch.Tensor)]
    for state in layer.states.values():
        tensors += [t for t in vars(state).values() if isinstance(t, torch.Tensor)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def test_report_counts_the_bytes_allocated_not_only_the_valid_slots(model):
    cache = PrunedCache(AdaKV(H2O(budget=20, window=4)))
    model.generate(random_ids(2, 70, seed=5), cache=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, layer in zip(cache.report().layers, cache.layers):
        assert layer.slots.storage.forward_view is None  # the forward's view was released
        assert row.bytes == storage_bytes(layer)
        assert row.bytes > kv_bytes_of_valid_slots(layer)
