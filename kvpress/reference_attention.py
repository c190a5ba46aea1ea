"""Attention over a pruned layer's slots, and the per-slot attention mass policies score with, in
PyTorch: the reference maths of every path `kvpress.attention_path` may choose.

`grouped_attention` reads dense keys and values with a mask built from slot validity and positions;
`quantized_attention` reads a KIVI-quantized layer (blocks of dequantized slots, or the quantized
decode kernel on CUDA). CUDA tensors go to the Triton kernels of `kvpress.triton_kernels`, which
compute the same quantities and are tested against these functions.

Queries are processed in chunks of rows, each chunk holding complete rows of logits, so the softmax
is exact per chunk and peak memory is `O(chunk * S)`: linear in the prompt, never `S x S`. A chunk
only reads the keys its last query can see, so prefill does about half the work of a full square.

Layout: the `q` queries of a forward are the last `q` slots of the layer (new tokens are appended),
so query `i` may attend slot `s` iff `valid[s]` and `s <= S - q + i`.
"""

from __future__ import annotations

import torch

from kvpress.kivi import block_of_slot
from kvpress.quantized import QuantizedStore
from kvpress.triton_kernels import use_triton
from kvpress.triton_kernels.quantization import quantized_decode_attention_triton

# fp32 logits one query chunk may hold (4 MiB): small chunks stay in cache and skip more of the
# causal triangle; measured faster than 16-64 MiB chunks on CPU (benchmarks/overhead.py).
CHUNK_ELEMENTS = 1 << 20
MIN_CHUNK_ROWS = 16
# fp32 elements of one block of dequantized keys or values (1 MiB) in `quantized_attention`
QUANTIZED_BLOCK_ELEMENTS = 1 << 18
# backend of the quantized decoding step; tests set "triton" to run the kernel in Triton's CPU interpreter
QUANTIZED_DECODE_BACKEND = "auto"


def grouped_attention(
    query: torch.Tensor,  # [B, Hq, q, D]
    key: torch.Tensor,  # [B, Hkv, S, D]
    value: torch.Tensor,  # [B, Hkv, S, Dv]
    slot_valid: torch.Tensor,  # [B, Hkv, S] bool
    *,
    scaling: float,
    softcap: float | None = None,
    query_valid: torch.Tensor | None = None,  # [B, q] bool; padding rows output zeros, add no mass
    weights: torch.Tensor | float | None = None,  # [q] fp32 row weights of the mass (a float: every row's); None: no mass
    want_output: bool = True,
    chunk_elements: int = CHUNK_ELEMENTS,
    positions: torch.Tensor | None = None,  # [B, Hkv, S] long, with `window` or `query_positions`
    window: int | None = None,  # sliding window: a query at position p sees positions > p - window
    query_positions: torch.Tensor | None = None,  # [B, q] long: causal order by position, not by slot
    heads_live: bool = False,  # the caller knows every KV head holds a valid slot (a host-side fact)
    slot_invalid: torch.Tensor | None = None,  # [B, Hkv, S] bool, ~slot_valid when the caller has it
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
                                     query_valid=query_valid, weights=_row_weights(weights, query),
                                     want_output=want_output)
    if query.shape[2] == 1 and window is None and query_valid is None and query_positions is None:
        return _decode_step(query, key, value, slot_valid, scaling, softcap, weights, want_output, heads_live,
                            slot_invalid)
    weights = _row_weights(weights, query)
    kf, vf = key.float(), value.float()
    return _chunked_attention(
        query, key.shape[2],
        lambda queries, visible: torch.matmul(queries, kf[:, :, :visible].transpose(-1, -2)),
        lambda probs, visible: torch.matmul(probs, vf[:, :, :visible]),
        slot_valid, scaling=scaling, softcap=softcap, query_valid=query_valid, weights=weights,
        want_output=want_output, chunk_elements=chunk_elements, positions=positions, window=window,
        query_positions=query_positions)


def _row_weights(weights, query):
    """`[q]` row weights from a float given for every row (tensors and None pass through)."""
    return torch.full((query.shape[2],), weights, device=query.device) if isinstance(weights, float) else weights


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


def _decode_step(query, key, value, slot_valid, scaling, softcap, weights, want_output, heads_live=False,
                 slot_invalid=None):
    """`grouped_attention` for one query token: the same quantities in a dozen ops (the decoding step's
    hot path on CPU); no causal limit applies, every valid slot is older than the query. The products
    run as 3-D `bmm` over `B * Hkv` (what `matmul` reduces the 4-D product to, without its expands and
    reshapes); a weight of exactly 1.0 and, with `heads_live`, the zeroing of heads without a valid
    slot are identities and are skipped."""
    batch, q_heads, _, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    pairs = batch * kv_heads
    queries = query.float().reshape(pairs, q_heads // kv_heads, dim)  # [B * Hkv, G, D]
    logits = torch.bmm(queries, key.float().reshape(pairs, slots, dim).transpose(1, 2)).mul_(scaling)  # [B*Hkv, G, S]
    if softcap is not None:
        logits = torch.tanh(logits / softcap).mul_(softcap)
    hidden = slot_valid.logical_not() if slot_invalid is None else slot_invalid
    logits.masked_fill_(hidden.view(pairs, 1, slots), torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1)
    live = None if heads_live else slot_valid.any(dim=-1)  # [B, Hkv]: False for a switched-off head
    mass = None
    if weights is not None:
        mass = probs.sum(dim=1).view(batch, kv_heads, slots)  # [B, Hkv, S]
        if not (isinstance(weights, float) and weights == 1.0):
            mass.mul_(weights if isinstance(weights, float) else weights[0])
        if live is not None:
            mass.mul_(live[..., None])
    output = None
    if want_output:
        output = torch.bmm(probs, value.float().reshape(pairs, slots, -1))  # [B * Hkv, G, Dv]
        if live is not None:
            output = output.view(batch, kv_heads, -1, output.shape[-1]).mul_(live[..., None, None])
        output = output.view(batch, 1, q_heads, -1).to(query.dtype)
    return output, mass
