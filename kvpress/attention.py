"""Attention over a pruned layer: which path computes it, and the per-slot attention mass policies
score with, in PyTorch.

`attend` chooses the path for one forward of a layer: the model's own attention function (bit-identical
to `DynamicCache`) when the stored slots are an exact causal prefix that the model's mask describes,
`quantized_attention` over a KIVI-quantized layer (blocks of dequantized slots, or the quantized decode
kernel on CUDA), else `grouped_attention` with a mask built from slot validity and positions.

Queries are processed in chunks of rows, each chunk holding complete rows of logits, so the softmax
is exact per chunk and peak memory is `O(chunk * S)`: linear in the prompt, never `S x S`. A chunk
only reads the keys its last query can see, so prefill does about half the work of a full square. The Triton
kernels in `kvpress.triton_kernels` compute the same quantities on CUDA and are tested against
these functions.

Layout: the `q` queries of a forward are the last `q` slots of the layer (new tokens are appended),
so query `i` may attend slot `s` iff `valid[s]` and `s <= S - q + i`.
"""

from __future__ import annotations

import math

import torch

from kvpress.kivi import block_of_slot
from kvpress.policy import AttentionRequest, Signals
from kvpress.quantized import QuantizedStore
from kvpress.triton_kernels import use_triton
from kvpress.triton_kernels.decode_attention import decode_attention
from kvpress.triton_kernels.quantization import quantized_decode_attention_triton

# fp32 logits one query chunk may hold (4 MiB): small chunks stay in cache and skip more of the
# causal triangle; measured faster than 16-64 MiB chunks on CPU (benchmarks/overhead.py).
CHUNK_ELEMENTS = 1 << 20
MIN_CHUNK_ROWS = 16
# backend of the fused decode step; tests set "triton" to run the kernel in Triton's CPU interpreter
FUSED_DECODE_BACKEND = "auto"
# fp32 elements of one block of dequantized keys or values (1 MiB) in `quantized_attention`
QUANTIZED_BLOCK_ELEMENTS = 1 << 18
# backend of the quantized decoding step (the same switch, for `quantized_attention`)
QUANTIZED_DECODE_BACKEND = "auto"


def fused_decode_fold(query: torch.Tensor) -> bool:
    """Whether a decoding step runs the fused decode kernel, which folds the attention mass into the
    running score in place (`triton_kernels/decode_attention.py`): on CUDA tensors with triton."""
    return use_triton(query)


def row_weights(num_rows: int, rows: int | None, decay: float, device) -> torch.Tensor:
    """`[num_rows]` weight of each query row in the mass: `decay ** age` for the last `rows` rows
    (all rows when None), 0 before them. Age 0 is the newest row."""
    # fp32 throughout (some devices, e.g. Apple's MPS, have no float64); `exp(age * ln decay)` keeps
    # the relative error of a power at fp32 rounding and underflows to 0 harmlessly
    age = torch.arange(num_rows - 1, -1, -1, device=device, dtype=torch.float32)
    weights = torch.exp(age * math.log(decay)) if decay != 1.0 else torch.ones_like(age)
    if rows is not None:
        weights = torch.where(age < rows, weights, torch.zeros_like(weights))
    return weights


def grouped_attention(
    query: torch.Tensor,  # [B, Hq, q, D]
    key: torch.Tensor,  # [B, Hkv, S, D]
    value: torch.Tensor,  # [B, Hkv, S, Dv]
    slot_valid: torch.Tensor,  # [B, Hkv, S] bool
    *,
    scaling: float,
    softcap: float | None = None,
    query_valid: torch.Tensor | None = None,  # [B, q] bool; padding rows output zeros, add no mass
    weights: torch.Tensor | None = None,  # [q] fp32 row weights of the mass; None: no mass
    want_output: bool = True,
    chunk_elements: int = CHUNK_ELEMENTS,
    positions: torch.Tensor | None = None,  # [B, Hkv, S] long, with `window` or `query_positions`
    window: int | None = None,  # sliding window: a query at position p sees positions > p - window
    query_positions: torch.Tensor | None = None,  # [B, q] long: causal order by position, not by slot
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Causal grouped-query attention with a per-slot validity mask.

    Returns `output [B, q, Hq, Dv]` (query dtype, the layout transformers' attention functions
    return) and `mass [B, Hkv, S]` fp32: `sum_g sum_i weights[i] * softmax(q_i k^T)[s]` over the
    `G` query heads of each KV head and the valid query rows.

    CUDA tensors go to the Triton kernels of `kvpress.triton_kernels` (same quantities, fused,
    O(S) memory; `KVPRESS_TRITON=0` keeps this PyTorch path). Rows that see no valid slot are the
    one difference: uniform here, zeros there; a layer's own new token is always visible, except
    in a KV head that holds no valid slot at all (`SlotStore.switch_off_heads`): its query heads output
    zeros and add no mass on both paths.

    With `query_positions`, a query sees the slots whose position is at most its own, wherever they
    are stored (LazyLLM appends revived tokens after newer ones); the PyTorch path computes it.
    """
    if query.is_cuda and window is None and query_positions is None:
        from kvpress.triton_kernels import attention_signals

        if use_triton(query):
            return attention_signals(query, key, value, slot_valid, scaling=scaling, softcap=softcap,
                                     query_valid=query_valid, weights=weights, want_output=want_output)
    if query.shape[2] == 1 and window is None and query_valid is None and query_positions is None:
        return _decode_step(query, key, value, slot_valid, scaling, softcap, weights, want_output)
    kf, vf = key.float(), value.float()
    return _chunked_attention(
        query, key.shape[2],
        lambda queries, visible: torch.matmul(queries, kf[:, :, :visible].transpose(-1, -2)),
        lambda probs, visible: torch.matmul(probs, vf[:, :, :visible]),
        slot_valid, scaling=scaling, softcap=softcap, query_valid=query_valid, weights=weights,
        want_output=want_output, chunk_elements=chunk_elements, positions=positions, window=window,
        query_positions=query_positions)


def _chunked_attention(query, slots, logits_of, output_of, slot_valid, *, scaling, softcap, query_valid, weights,
                       want_output, chunk_elements, positions, window, query_positions=None):
    """`grouped_attention` over any key/value reader, in chunks of complete query rows: `logits_of(queries
    [B, Hkv, G * c, D] fp32, V)` returns their products with the first `V` keys, `output_of(probs [B,
    Hkv, G * c, V], V)` the probabilities times the first `V` values."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads = slot_valid.shape[1]
    group = q_heads // kv_heads
    device = slot_valid.device
    qf = query.float().view(batch, kv_heads, group, q_len, dim)
    slot_index = torch.arange(slots, device=device)
    fill = torch.finfo(torch.float32).min
    # at least MIN_CHUNK_ROWS rows per chunk: a Python loop of one row per iteration costs more than the
    # transient memory of a few rows of logits at long prompts
    chunk = max(MIN_CHUNK_ROWS, chunk_elements // max(1, batch * q_heads * slots))
    hidden_slots = ~slot_valid[:, :, None, None, :]  # [B, Hkv, 1, 1, S]

    outputs = []
    mass = torch.zeros(batch, kv_heads, slots, device=device) if weights is not None else None
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        rows = stop - start
        # no row of this chunk sees past its last query's slot: skip those keys (the causal triangle)
        visible = slots - q_len + stop if query_positions is None else slots
        queries = qf[:, :, :, start:stop].reshape(batch, kv_heads, group * rows, dim)
        logits = logits_of(queries, visible).mul_(scaling)
        logits = logits.view(batch, kv_heads, group, rows, visible)
        if softcap is not None:
            logits = torch.tanh(logits / softcap).mul_(softcap)
        last_visible = slots - q_len + torch.arange(start, stop, device=device)  # [c]
        if query_positions is None:
            hidden = (slot_index[:visible] > last_visible[:, None]) | hidden_slots[..., :visible]  # [B,Hkv,1,c,V]
        else:
            later = positions[:, :, None, None, :] > query_positions[:, None, None, start:stop, None]
            hidden = later | hidden_slots
        if window is not None:
            if query_positions is None:  # the queries are the last q slots
                rows_at = positions[:, :, slots - q_len + start:slots - q_len + stop]  # [B, Hkv, c]
            else:
                rows_at = query_positions[:, None, start:stop]  # [B, 1, c]
            too_old = positions[:, :, None, :visible] <= rows_at[..., None] - window  # [B, Hkv, c, V]
            hidden = hidden | too_old[:, :, None]
        probs = torch.softmax(logits.masked_fill_(hidden, fill), dim=-1)
        if query_valid is not None:
            probs = probs * query_valid[:, None, None, start:stop, None]
        if want_output:
            out = output_of(probs.view(batch, kv_heads, group * rows, visible), visible)
            outputs.append(out.view(batch, kv_heads, group, rows, -1))
        if mass is not None:
            # [c] @ [B, Hkv, G, c, V] -> [B, Hkv, G, V], then over the group
            mass[..., :visible] += torch.matmul(weights[start:stop], probs).sum(dim=2)
    live = slot_valid.any(dim=-1)  # [B, Hkv]: False for a dropped head
    if mass is not None:
        mass = mass * live[..., None]
    output = None
    if want_output:
        output = (torch.cat(outputs, dim=3) * live[:, :, None, None, None]).reshape(batch, q_heads, q_len, -1)
        output = output.transpose(1, 2).to(query.dtype).contiguous()
    return output, mass


def quantized_attention(
    query: torch.Tensor,  # [B, Hq, q, D]
    store: QuantizedStore,  # the layer's slots: quantized, then full-precision residual
    slot_valid: torch.Tensor,  # [B, Hkv, S] bool
    *,
    scaling: float,
    softcap: float | None = None,
    query_valid: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    want_output: bool = True,
    positions: torch.Tensor | None = None,
    window: int | None = None,
    query_positions: torch.Tensor | None = None,
    block_elements: int | None = None,  # default QUANTIZED_BLOCK_ELEMENTS
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`grouped_attention` over a KIVI-quantized layer without dequantizing the layer: keys are
    dequantized one block of slots at a time for the logits, values one block at a time for the output,
    so the fp32 temporaries are a block (`block_elements` per tensor) and one chunk of logits, never the
    whole quantized region. The residual is read as it is. On CUDA, a decoding step (no softcap, no
    sliding window) runs the quantized decode kernel (`triton_kernels/quantization.py`), which reads the
    packed codes directly; it returns the logits and their log-sum-exp, from which the mass follows."""
    batch, _, q_len, dim = query.shape
    if (q_len == 1 and softcap is None and window is None and query_valid is None and query_positions is None
            and use_triton(query, QUANTIZED_DECODE_BACKEND)):
        return _quantized_decode(query, store, slot_valid, scaling, weights, want_output)
    block_elements = block_elements or QUANTIZED_BLOCK_ELEMENTS
    block = max(MIN_CHUNK_ROWS, block_elements // max(1, batch * slot_valid.shape[1] * dim))

    def logits_of(queries, visible):
        logits = queries.new_empty(*queries.shape[:-1], visible)
        for start in range(0, visible, block):
            stop = min(visible, start + block)
            logits[..., start:stop] = torch.matmul(queries, store.key_block(start, stop).transpose(-1, -2))
        return logits

    def output_of(probs, visible):
        out = None
        for start in range(0, visible, block):
            stop = min(visible, start + block)
            part = torch.matmul(probs[..., start:stop], store.value_block(start, stop))
            out = part if out is None else out.add_(part)
        return out

    return _chunked_attention(query, store.num_slots, logits_of, output_of, slot_valid, scaling=scaling,
                              softcap=softcap, query_valid=query_valid, weights=weights, want_output=want_output,
                              chunk_elements=CHUNK_ELEMENTS, positions=positions, window=window,
                              query_positions=query_positions)


def _quantized_decode(query, store, slot_valid, scaling, weights, want_output):
    """One query token over a quantized layer with the Triton kernel; the mass from its logits."""
    batch, q_heads = query.shape[:2]
    kv_heads = slot_valid.shape[1]
    block = block_of_slot(store.key_counts, store.quantized_slots)
    result = quantized_decode_attention_triton(
        query[:, :, 0], store.key_codes, store.key_scale, store.key_zero, block, store.value_codes,
        store.value_scale, store.value_zero, store.residual_keys, store.residual_values, slot_valid,
        scaling=scaling, bits=store.quant.bits, return_logits=weights is not None)
    out, mass = result, None
    if weights is not None:
        out, logits, lse = result
        # a head without any valid slot has lse -inf: no mass (as on the other paths)
        probs = torch.where(torch.isfinite(lse)[..., None], torch.exp(logits - lse[..., None]), 0.0)
        mass = probs.view(batch, kv_heads, q_heads // kv_heads, -1).sum(dim=2).mul_(weights[0])
    output = out.view(batch, 1, q_heads, -1).to(query.dtype) if want_output else None
    return output, mass


def _decode_step(query, key, value, slot_valid, scaling, softcap, weights, want_output):
    """`grouped_attention` for one query token: the same quantities in a dozen ops (the decoding step's
    hot path on CPU); no causal limit applies, every valid slot is older than the query."""
    batch, q_heads, _, dim = query.shape
    kv_heads = key.shape[1]
    queries = query.float().view(batch, kv_heads, q_heads // kv_heads, dim)  # [B, Hkv, G, D]
    logits = torch.matmul(queries, key.float().transpose(-1, -2)).mul_(scaling)  # [B, Hkv, G, S]
    if softcap is not None:
        logits = torch.tanh(logits / softcap).mul_(softcap)
    logits.masked_fill_(~slot_valid[:, :, None, :], torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1)
    live = slot_valid.any(dim=-1)  # [B, Hkv]: False for a switched-off head
    mass = probs.sum(dim=2).mul_(weights[0]).mul_(live[..., None]) if weights is not None else None
    output = None
    if want_output:
        output = torch.matmul(probs, value.float()).mul_(live[..., None, None])  # [B, Hkv, G, Dv]
        output = output.view(batch, 1, q_heads, -1).to(query.dtype)
    return output, mass


def new_token_validity(mask: torch.Tensor | None, batch: int, q: int) -> torch.Tensor | None:
    """`[B, q]` bool: which of the `q` new tokens are real, read from the model's mask (the new tokens
    are its last `q` columns; a real key is visible from its own query row). None: all real."""
    if mask is None:
        return None
    if mask.dim() == 2:  # flash-attention: (B, kv) with 1 = real
        return mask[:, -q:].bool()
    columns = mask[..., -q:]  # a view; reduced over rows without building a [B, 1, q, q] bool copy
    if columns.dtype == torch.bool:
        seen_by_some_row = columns.any(dim=-2)
    else:
        seen_by_some_row = columns.amax(dim=-2) > torch.finfo(columns.dtype).min / 2
    return seen_by_some_row.any(dim=1).expand(batch, q)  # [B, q]


def visible(mask: torch.Tensor) -> torch.Tensor:
    """A 4-D mask as bool (True = may attend), whether it is bool or additive float."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def mask_hides_padding(mask: torch.Tensor, slot_valid: torch.Tensor, q: int) -> bool:
    """Whether the model's mask hides every padding slot held before this forward (a forward fed
    without the batch's padding mask, e.g. a continuation called by hand, does not). A host sync:
    called for multi-token forwards over a padded cache only."""
    older = slot_valid[..., :-q].any(dim=1)  # [B, P]: some head holds a real token there
    if mask.dim() == 2:
        shown = mask[:, :-q].bool()
    else:
        columns = mask[..., :-q]
        shown = (columns.any(dim=-2) if columns.dtype == torch.bool
                 else columns.amax(dim=-2) > torch.finfo(columns.dtype).min / 2).any(dim=1)
    return not bool((shown & ~older).any())


def mask_has_structure(mask: torch.Tensor | None, new_valid: torch.Tensor | None, q: int,
                       window: int | None = None) -> bool:
    """Whether a 4-D model mask says more than causal order, padding and the layer's sliding window:
    among real query rows, the new tokens must see exactly the real new tokens at or before them (and
    within the window), and, without a window, every real row the same older columns. Custom 4-D masks
    and bidirectional blocks fail this; transformers' causal, sliding-window and padding masks pass."""
    if mask is None or mask.dim() != 4 or q == 1:
        return False
    allowed = visible(mask).any(dim=1)  # [B, q, kv]
    batch = allowed.shape[0]
    real = new_valid if new_valid is not None else torch.ones(batch, q, dtype=torch.bool, device=mask.device)
    causal = torch.ones(q, q, dtype=torch.bool, device=mask.device).tril()
    expected_new = causal & real[:, None, :]  # [B, q, q]
    if window is not None:
        position = torch.cumsum(real.long(), dim=-1)  # [B, q], real tokens only matter
        expected_new = expected_new & (position[:, :, None] - position[:, None, :] < window)
    rows = real[:, :, None]
    new_block_differs = ((allowed[..., -q:] != expected_new) & rows).any()
    if window is not None:
        return bool(new_block_differs)
    older = allowed[..., :-q]
    reference_row = older.gather(1, real.long().argmax(dim=1)[:, None, None].expand(-1, 1, older.shape[-1]))
    older_differs = ((older != reference_row) & rows).any()
    return bool(new_block_differs | older_differs)


def attend(layer, original, module, query, key, value, attention_mask, args, kwargs,
           request: AttentionRequest | None, phase: str, new_valid: torch.Tensor | None, layout=None):
    """One forward's attention for a pruned layer, and the signals its policy asked for.

    The model's own function runs when the slots are an exact causal prefix its mask describes (no slot
    was ever invalid, the mask has this layer's columns, and a sliding-window layer never evicted out
    of order) and the policy needs no signal over every row; window rows are then recomputed from the
    last queries. Otherwise `grouped_attention` runs with validity (and the sliding window) from the
    slots; with a `TokenLayout` (kvpress/slots.py) it also runs with the layout's validity and causal
    order by position. Returns `(output as the model's function returns it, Signals)`."""
    q = query.shape[2]
    slots = layer.slots
    window = layer.sliding_window
    if layout is not None:  # a policy chose the tokens (LazyLLM): validity and order come from the layout
        return _attend_layout(layer, original, module, query, key, value, args, kwargs, request, phase, layout)
    # the model's mask describes the slots while they are the exact prefix it was built for (padding
    # included); after an eviction or a dropped slot, validity and positions come from the slots
    # quantized storage is read from its store (transformers got shape-only placeholders)
    clean = (slots.exact_prefix and slots.quantized is None
             and (attention_mask is None or attention_mask.shape[-1] == key.shape[-2]))
    if clean and slots.has_padding:  # the model's mask must know the padding the slots hold
        clean = attention_mask is not None and (q == 1 or mask_hides_padding(attention_mask, slots.valid, q))
    if (not clean or request is not None) and mask_has_structure(attention_mask, new_valid, q, window):
        raise ValueError(
            f"layer {layer.layer_idx}: the attention mask carries structure beyond causal order and padding "
            "(a custom 4-D mask or bidirectional blocks); PrunedCache can honour it only with the model's own "
            "attention over a cache that has not evicted yet and a policy that needs no attention signal. "
            "Use a causal mask, or PrunedCache(None) / an attention-free policy (knorm, streamingllm) here.")
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")

    mass = None
    if slots.quantized is not None:
        weights = row_weights(q, request.rows, request.decay, query.device) if request else None
        out, mass = quantized_attention(query, slots.quantized, slots.valid, scaling=scaling, softcap=softcap,
                                        query_valid=new_valid, weights=weights, positions=slots.positions,
                                        window=window)
        return (out, None), Signals(phase=phase, q=q, request=request, mass=mass, output=out, query=query,
                                    module=module)
    score_state = layer.score_state() if q == 1 and request is not None and request.accumulate else None
    if score_state is not None and window is None and fused_decode_fold(query):
        # the fused decode kernel folds this step's mass into the running score in place
        weights = row_weights(1, request.rows, request.decay, key.device)
        running = score_state.scores.contiguous()  # the kernel folds a dense buffer (a copy when capacity > used)
        out, running = decode_attention(query, key, value, slots.valid, scaling=scaling, softcap=softcap,
                                        weights=weights, scores=running, decay=request.decay,
                                        backend=FUSED_DECODE_BACKEND)
        score_state.scores = running
        return (out, None), Signals(phase=phase, q=q, request=request, mass=None, output=out, query=query,
                                    module=module, folded=True)
    if clean and (request is None or (request.rows is not None and request.rows < q)):
        output = original(module, query, key, value, attention_mask, *args, **kwargs)
        if request is not None:  # window rows only: recompute them, not the whole attention
            rows = request.rows
            weights = row_weights(rows, None, request.decay, key.device)
            row_valid = new_valid[:, -rows:] if new_valid is not None else None
            _, mass = grouped_attention(query[:, :, -rows:], key, value, slots.valid, scaling=scaling,
                                        softcap=softcap, query_valid=row_valid, weights=weights,
                                        want_output=False, positions=slots.positions, window=window)
    else:
        weights = row_weights(q, request.rows, request.decay, key.device) if request else None
        # padding query rows output zeros and add no mass (a switched-off head's slots are invalid
        # too, so validity is read from the mask, not from the slots)
        out, mass = grouped_attention(query, key, value, slots.valid, scaling=scaling, softcap=softcap,
                                      query_valid=new_valid, weights=weights, positions=slots.positions,
                                      window=window)
        output = (out, None)
    return output, Signals(phase=phase, q=q, request=request, mass=mass, output=output[0], query=query,
                           module=module)


def _attend_layout(layer, original, module, query, key, value, args, kwargs, request, phase, layout):
    """`attend` for tokens a policy laid out itself: padding rows from `layout.valid`, and each query sees
    the slots at or before its position. Real tokens in order in a layer that held nothing before are
    plain causal attention: SDPA computes it (as fast as the model's own path), and only the rows the
    policy asked for are recomputed for their mass."""
    q = query.shape[2]
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")
    slots = layer.slots
    weights = row_weights(q, request.rows, request.decay, query.device) if request else None
    if slots.quantized is not None:  # transformers got placeholders: read the store
        out, mass = quantized_attention(query, slots.quantized, slots.valid, scaling=scaling, softcap=softcap,
                                        query_valid=layout.valid, weights=weights, positions=slots.positions,
                                        window=layer.sliding_window, query_positions=layout.positions)
        return (out, None), Signals(phase=phase, q=q, request=request, mass=mass, output=out, query=query,
                                    module=module)
    causal = layout.ordered and slots.used == q and layer.sliding_window is None
    if causal and getattr(module.config, "_attn_implementation", None) == "sdpa" and (
            request is None or (request.rows is not None and request.rows < q)):
        output = original(module, query, key, value, None, *args, **kwargs)  # SDPA: causal when mask is None
        mass = None
        if request is not None:
            rows = request.rows
            _, mass = grouped_attention(query[:, :, -rows:], key, value, slots.valid, scaling=scaling,
                                        softcap=softcap, weights=row_weights(rows, None, request.decay, key.device),
                                        want_output=False)
        return output, Signals(phase=phase, q=q, request=request, mass=mass, output=output[0], query=query,
                               module=module)
    out, mass = grouped_attention(query, key, value, slots.valid, scaling=scaling, softcap=softcap,
                                  query_valid=layout.valid, weights=weights, positions=slots.positions,
                                  window=layer.sliding_window, query_positions=layout.positions)
    return (out, None), Signals(phase=phase, q=q, request=request, mass=mass, output=out, query=query,
                                module=module)
