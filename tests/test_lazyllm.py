"""LazyLLM (policies/lazyllm.py): pruning inside the forward, the auxiliary cache and revival, checked
against DynamicCache and against manual forwards of the same decoder layers on tiny models."""

from __future__ import annotations

import pytest
import torch
from tiny_models import left_pad, random_ids, tiny_model
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvpress import KVQuant, PrunedCache
from kvpress.policies.lazyllm import LazyLLM

LAYERS = 6
SCHEDULE = ((1, 0.6), (3, 0.3))


def greedy(model, ids, cache, steps=10, mask=None):
    return model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=steps, do_sample=False)


def state_of(cache):
    return cache.shared_state(cache.policy)


def positions_held(cache, layer, row=0):
    slots = cache.layers[layer].slots
    return slots.positions[row, 0][slots.valid[row, 0]].tolist()


@pytest.fixture(params=["model's forward", "working set"])
def unchanged_work(request, monkeypatch):
    """Both paths of a schedule layer that prunes nothing: the shortcut that leaves the forward to the
    model, and the working-set path (the tokens laid out and attended by position) it skips."""
    from kvpress.policies import lazyllm

    monkeypatch.setattr(lazyllm, "SKIP_UNCHANGED_WORK", request.param == "model's forward")
    laid_out = []  # schedule layers past the shortcut: the working set is laid out for the layers above
    original = lazyllm.LazyLLM._stop
    monkeypatch.setattr(lazyllm.LazyLLM, "_stop", staticmethod(lambda *a: laid_out.append(1) or original(*a)))
    yield request.param
    assert bool(laid_out) == (request.param == "working set"), f"{len(laid_out)} working sets laid out"


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"),
                                         ("qwen2", "eager"), ("qwen3", "sdpa"), ("phi3", "sdpa")])
def test_schedule_that_prunes_nothing_matches_dynamic_cache(family, attn, unchanged_work):
    model = tiny_model(family, attn, num_hidden_layers=LAYERS)
    ids = random_ids(1, 40)
    expected = greedy(model, ids, DynamicCache())
    assert torch.equal(greedy(model, ids, PrunedCache(LazyLLM(schedule=((1, 1.0), (0.5, 1.0))))), expected)


def test_schedule_that_prunes_nothing_matches_dynamic_cache_on_a_padded_batch(unchanged_work):
    model = tiny_model("llama", "eager", num_hidden_layers=LAYERS)
    ids, mask = left_pad([random_ids(1, 30, seed=1)[0], random_ids(1, 21, seed=2)[0]])
    expected = greedy(model, ids, DynamicCache(), mask=mask)
    assert torch.equal(greedy(model, ids, PrunedCache(LazyLLM(schedule=((2, 1.0),))), mask=mask), expected)


def test_padded_batch_row_equals_the_row_alone():
    model = tiny_model("llama", "sdpa", num_hidden_layers=LAYERS)
    rows = [random_ids(1, 30, seed=1)[0], random_ids(1, 22, seed=2)[0]]
    ids, mask = left_pad(rows)
    batched = greedy(model, ids, PrunedCache(LazyLLM(schedule=SCHEDULE)), mask=mask)
    for index, row in enumerate(rows):
        alone = greedy(model, row[None], PrunedCache(LazyLLM(schedule=SCHEDULE)))
        assert torch.equal(batched[index, -10:], alone[0, -10:])


# ---- a manual forward of the same decoder layers (Llama, eager attention) ----
def manual_layer(model, index, hidden, positions, keep_rows=None):
    """Decoder layer `index` of a Llama model on `hidden [1, n, D]` at `positions [n]`, causal by position.
    Returns (output, keys, values, mean attention of the last row over the n tokens)."""
    layer = model.model.layers[index]
    cos, sin = model.model.rotary_emb(hidden, positions[None])
    dynamic = DynamicCache()
    mask = torch.where(positions[None, :] <= positions[:, None], 0.0, torch.finfo(torch.float32).min)
    attn_out, weights = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=(cos, sin),
                                        attention_mask=mask[None, None], cache=dynamic)
    hidden = hidden + attn_out
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, dynamic.layers[index].keys, dynamic.layers[index].values, weights[0, :, -1].mean(0)


def test_kept_tokens_match_a_manual_forward_restricted_to_them():
    model = tiny_model("llama", "eager", num_hidden_layers=LAYERS)
    ids = random_ids(1, 40, seed=3)
    cache = PrunedCache(LazyLLM(schedule=SCHEDULE))
    with torch.no_grad():
        logits = model(ids, cache=cache, use_cache=True).logits[0, -1]
        hidden = model.model.embed_tokens(ids)
        present = torch.arange(40)
        for index in range(LAYERS):
            out, keys, values, attention = manual_layer(model, index, hidden[:, present], present)
            hidden = hidden.clone()
            hidden[:, present] = out
            layer = cache.layers[index]
            assert positions_held(cache, index) == present.tolist()
            torch.testing.assert_close(layer.keys[:, :, layer.valid[0, 0]], keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.values[:, :, layer.valid[0, 0]], values, rtol=1e-5, atol=1e-5)
            keep = dict(SCHEDULE).get(index)
            if keep is not None:  # the naive selection: top round(keep * 40) by the last row, last kept
                attention[-1] = float("inf")
                count = round(keep * 40)
                present = present[attention.topk(count).indices.sort().values]
        reference = model.lm_head(model.model.norm(hidden[:, -1]))[0]
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    assert len(positions_held(cache, 2)) == 24 and len(positions_held(cache, 5)) == 12
    state = state_of(cache)
    assert state.computed == 2 * 40 + 2 * 24 + 2 * 12  # token-layers computed: nothing twice, nothing skipped twice
    assert sorted(state.aux_position[0].tolist()) == sorted(set(range(40)) - set(positions_held(cache, 5)))


def test_revived_tokens_match_a_direct_computation_and_are_computed_once_per_layer():
    model = tiny_model("llama", "eager", num_hidden_layers=LAYERS)
    cache = PrunedCache(LazyLLM(schedule=SCHEDULE))
    ids = random_ids(1, 40, seed=4)
    revived_checked = 0
    with torch.no_grad():
        logits = model(ids, cache=cache, use_cache=True).logits[:, -1]
        for step in range(8):
            state = state_of(cache)
            before = {layer: set(positions_held(cache, layer)) for layer in range(LAYERS)}
            aux = {int(p): (state.aux_hidden[0, i].clone(), int(state.aux_layer[0, i]), int(state.aux_rope[0, i]))
                   for i, p in enumerate(state.aux_position[0]) if p >= 0}
            token = logits.argmax(-1, keepdim=True)
            logits = model(token, cache=cache, use_cache=True).logits[:, -1]
            for position, (hidden, stopped_at, rope) in aux.items():
                above = stopped_at + 1
                if position in before[above] or position not in positions_held(cache, above):
                    continue
                # its KV at the first layer it skipped comes from the stored hidden state alone
                layer = model.model.layers[above]
                cos, sin = model.model.rotary_emb(hidden[None, None], torch.tensor([[rope]]))
                normed = layer.input_layernorm(hidden[None, None])
                shape = (1, 1, -1, layer.self_attn.head_dim)
                key = layer.self_attn.k_proj(normed).view(shape).transpose(1, 2)
                _, key = apply_rotary_pos_emb(key, key, cos, sin)
                value = layer.self_attn.v_proj(normed).view(shape).transpose(1, 2)
                slots = cache.layers[above].slots
                slot = ((slots.positions[0, 0] == position) & slots.valid[0, 0]).nonzero()[0, 0]
                torch.testing.assert_close(slots.keys[0, :, slot], key[0, :, 0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(slots.values[0, :, slot], value[0, :, 0], rtol=1e-5, atol=1e-5)
                # and its output there attends the slots at or before its position: the next layer's KV
                if above + 1 < LAYERS and position in positions_held(cache, above + 1) \
                        and position not in before[above + 1]:
                    context = slots.valid[0, 0] & (slots.positions[0, 0] <= position)
                    query = layer.self_attn.q_proj(normed).view(1, 1, -1, layer.self_attn.head_dim).transpose(1, 2)
                    query, _ = apply_rotary_pos_emb(query, query, cos, sin)
                    groups = query.shape[1] // slots.keys.shape[1]
                    k = slots.keys[0][:, context].repeat_interleave(groups, 0)
                    v = slots.values[0][:, context].repeat_interleave(groups, 0)
                    probs = torch.softmax(query[0] @ k.transpose(-1, -2) * layer.self_attn.scaling, dim=-1)
                    attended = (probs @ v).transpose(0, 1).reshape(1, 1, -1)
                    out = hidden[None, None] + layer.self_attn.o_proj(attended)
                    out = out + layer.mlp(layer.post_attention_layernorm(out))
                    nxt = model.model.layers[above + 1]
                    key2 = nxt.self_attn.k_proj(nxt.input_layernorm(out)).view(shape).transpose(1, 2)
                    _, key2 = apply_rotary_pos_emb(key2, key2, cos, sin)
                    upper = cache.layers[above + 1].slots
                    slot2 = ((upper.positions[0, 0] == position) & upper.valid[0, 0]).nonzero()[0, 0]
                    torch.testing.assert_close(upper.keys[0, :, slot2], key2[0, :, 0], rtol=1e-4, atol=1e-4)
                    revived_checked += 1
    state = state_of(cache)
    assert state.revived > 0 and revived_checked > 0
    held = 0
    for index in range(LAYERS):
        positions = positions_held(cache, index)
        assert len(positions) == len(set(positions))  # no token computed twice at a layer
        held += len(positions)
    assert state.computed == held  # every computation left exactly one KV slot, none was recomputed
    assert state.computed <= state.dense


def test_chunked_prefill_revives_older_tokens_and_keeps_positions():
    model = tiny_model("llama", "sdpa", num_hidden_layers=LAYERS)
    cache = PrunedCache(LazyLLM(schedule=SCHEDULE))
    ids = random_ids(1, 60, seed=5)
    with torch.no_grad():
        model(ids[:, :40], cache=cache, use_cache=True)
        revived = state_of(cache).revived
        model(ids[:, 40:], cache=cache, use_cache=True)
    state = state_of(cache)
    assert state.revived > revived
    for index in range(LAYERS):
        positions = positions_held(cache, index)
        assert len(positions) == len(set(positions)) and max(positions) == 59
        assert cache.layers[index].get_seq_length() == 60
    assert len(positions_held(cache, 0)) == 60 and len(positions_held(cache, 5)) < 60


def test_report_counts_the_auxiliary_cache():
    model = tiny_model("llama", "sdpa", num_hidden_layers=LAYERS)
    cache = PrunedCache(LazyLLM(schedule=SCHEDULE))
    with torch.no_grad():
        model(random_ids(1, 40), cache=cache, use_cache=True)
    state = state_of(cache)
    report = cache.report()
    aux = sum(getattr(state, name).nbytes for name in ("aux_hidden", "aux_position", "aux_rope", "aux_layer",
                                                         "real_seen"))
    assert report.shared_bytes == aux and state.aux_hidden.shape[1] == 40 - 12
    assert report.total_bytes == sum(row.bytes for row in report.layers) + aux
    assert [row.kept for row in report.layers] == [40, 40, 24, 24, 12, 12]
    assert "policy state across layers" in str(report)
    assert 0 < cache.policy.skipped_share(cache) < 1


def test_composes_with_quantized_storage():
    model = tiny_model("llama", "sdpa", num_hidden_layers=LAYERS)
    ids = random_ids(1, 40, seed=6)
    plain = PrunedCache(LazyLLM(schedule=SCHEDULE))
    quantized = PrunedCache(LazyLLM(schedule=SCHEDULE), quantization=KVQuant(bits=8, group_size=8, residual=8))
    expected = greedy(model, ids, plain)
    assert torch.equal(greedy(model, ids, quantized), expected)
    assert all(layer.store is not None for layer in quantized.layers)
    assert quantized.report().total_bytes < plain.report().total_bytes


@pytest.mark.parametrize("schedule,message", [
    ((), "non-empty"), (((1, 0.5, 2),), "pairs"), (((1, 0.0),), "keep must be a fraction"),
    (((1, 1.5),), "keep must be a fraction"), (((-1, 0.5),), "layer must be an int"),
    (((1.0, 0.5),), "layer must be an int"), (((1, 0.3), (2, 0.6)), "must not increase"),
])
def test_bad_schedules_are_refused(schedule, message):
    with pytest.raises(ValueError, match=message):
        LazyLLM(schedule=schedule)


def test_schedules_that_do_not_fit_the_model_are_refused():
    model = tiny_model("llama", "sdpa", num_hidden_layers=LAYERS)
    with pytest.raises(ValueError, match="skip nothing"):
        model(random_ids(1, 10), cache=PrunedCache(LazyLLM(schedule=((5, 0.5),))), use_cache=True)
    with pytest.raises(ValueError, match="must increase"):
        model(random_ids(1, 10), cache=PrunedCache(LazyLLM(schedule=((3, 0.5), (0.5, 0.4)))), use_cache=True)


HYBRID = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention",
          "sliding_attention"]


@pytest.mark.parametrize("family,attn", [("gemma2", "eager"), ("gemma3", "sdpa")])
def test_models_mixing_sliding_and_full_layers(family, attn):
    model = tiny_model(family, attn, num_hidden_layers=LAYERS, layer_types=HYBRID, sliding_window=16)
    ids = random_ids(1, 40, seed=8)
    expected = greedy(model, ids, DynamicCache(config=model.config))
    assert torch.equal(greedy(model, ids, PrunedCache(LazyLLM(schedule=((1, 1.0),)))), expected)
    policy = LazyLLM(schedule=((0, 0.6), (3, 0.3)))
    assert policy.pruning_layers(LAYERS, tuple(HYBRID)) == {2: 0.6, 4: 0.3}  # sliding layers rank only their window
    cache = PrunedCache(policy)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    assert [len(positions_held(cache, i)) for i in (0, 1, 2, 4)] == [15, 15, 40, 24]
    # a sliding layer holds what reached it, within its window by position (the last 15 of 40 tokens):
    # layer 3 what layer 2 kept (layer 4 holds it), layer 5 part of what layer 4 kept
    recent = [p for p in positions_held(cache, 4) if p >= 40 - 15]
    assert positions_held(cache, 3) == recent
    assert set(positions_held(cache, 5)) < set(recent) and 39 in positions_held(cache, 5)
    decoding = PrunedCache(policy)
    out = greedy(model, ids, decoding)
    assert out.shape[1] > 41 and state_of(decoding).revived > 0  # decoding (revival included) runs


def test_right_padding_is_refused():
    model = tiny_model("llama", "sdpa", num_hidden_layers=LAYERS)
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with pytest.raises(ValueError, match="pad on the left"):
        model(ids, attention_mask=mask, cache=PrunedCache(LazyLLM(schedule=SCHEDULE)), use_cache=True)


def test_every_layer_sliding_model_applies_its_window_by_position():
    # Mistral with a window shorter than the prompt: layers drop tokens older than the window, and a
    # schedule that keeps everything still equals DynamicCache's sliding layers
    model = tiny_model("mistral", "sdpa", num_hidden_layers=LAYERS, sliding_window=24)
    ids = random_ids(1, 40, seed=7)
    expected = greedy(model, ids, DynamicCache(config=model.config))
    cache = PrunedCache(LazyLLM(schedule=((1, 1.0),)), config=model.config)
    assert torch.equal(greedy(model, ids, cache), expected)
    pruned = PrunedCache(LazyLLM(schedule=SCHEDULE), config=model.config)
    greedy(model, ids, pruned)
    for index in range(LAYERS):
        assert min(positions_held(pruned, index)) >= 49 - 24  # nothing older than the window
