"""Attention over a pruned layer, and the per-slot attention mass policies score with, in PyTorch.

Queries are processed in chunks of rows, each chunk holding complete rows of logits, so the softmax
is exact per chunk and peak memory is `O(chunk * S)`: linear in the prompt, never `S x S`. A chunk
only reads the keys its last query can see, so prefill does about half the work of a full square. The Triton
kernels in `kvpress.triton_kernels` compute the same quantities on CUDA and are tested against
these functions.

Layout: the `q` queries of a forward are the last `q` slots of the layer (new tokens are appended),
so query `i` may attend slot `s` iff `valid[s]` and `s <= S - q + i`.
"""

from __future__ import annotations

import torch

# fp32 logits one query chunk may hold (4 MiB): small chunks stay in cache and skip more of the
# causal triangle; measured faster than 16-64 MiB chunks on CPU (benchmarks/overhead.py).
CHUNK_ELEMENTS = 1 << 20


def row_weights(num_rows: int, rows: int | None, decay: float, device) -> torch.Tensor:
    """`[num_rows]` weight of each query row in the mass: `decay ** age` for the last `rows` rows
    (all rows when None), 0 before them. Age 0 is the newest row."""
    age = torch.arange(num_rows - 1, -1, -1, device=device, dtype=torch.float64)
    weights = torch.exp(age * torch.log(torch.tensor(decay, dtype=torch.float64))) if decay != 1.0 \
        else torch.ones(num_rows, dtype=torch.float64, device=device)
    if rows is not None:
        weights = torch.where(age < rows, weights, torch.zeros_like(weights))
    return weights.float()


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
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Causal grouped-query attention with a per-slot validity mask.

    Returns `output [B, q, Hq, Dv]` (query dtype, the layout transformers' attention functions
    return) and `mass [B, Hkv, S]` fp32: `sum_g sum_i weights[i] * softmax(q_i k^T)[s]` over the
    `G` query heads of each KV head and the valid query rows.

    CUDA tensors go to the Triton kernels of `kvpress.triton_kernels` (same quantities, fused,
    O(S) memory; `KVPRESS_TRITON=0` keeps this PyTorch path). Rows that see no valid slot are the
    one difference: uniform here, zeros there; a layer's own new token is always visible, except
    in a KV head that holds no valid slot at all (`PrunedLayer.drop_heads`): its query heads output
    zeros and add no mass on both paths.
    """
    if query.is_cuda:
        from kvpress.triton_kernels import attention_signals, use_triton

        if use_triton(query):
            return attention_signals(query, key, value, slot_valid, scaling=scaling, softcap=softcap,
                                     query_valid=query_valid, weights=weights, want_output=want_output)
    batch, q_heads, q_len, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    qf = query.float().view(batch, kv_heads, group, q_len, dim)
    kf, vf = key.float(), value.float()
    slot_index = torch.arange(slots, device=key.device)
    fill = torch.finfo(torch.float32).min
    chunk = max(1, chunk_elements // max(1, batch * q_heads * slots))
    hidden_slots = ~slot_valid[:, :, None, None, :]  # [B, Hkv, 1, 1, S]

    outputs = []
    mass = torch.zeros(batch, kv_heads, slots, device=key.device) if weights is not None else None
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        rows = stop - start
        # no row of this chunk sees past its last query's slot: skip those keys (the causal triangle)
        visible = slots - q_len + stop
        queries = qf[:, :, :, start:stop].reshape(batch, kv_heads, group * rows, dim)
        logits = torch.matmul(queries, kf[:, :, :visible].transpose(-1, -2)).mul_(scaling)
        logits = logits.view(batch, kv_heads, group, rows, visible)
        if softcap is not None:
            logits = torch.tanh(logits / softcap).mul_(softcap)
        last_visible = slots - q_len + torch.arange(start, stop, device=key.device)  # [c]
        hidden = (slot_index[:visible] > last_visible[:, None]) | hidden_slots[..., :visible]  # [B,Hkv,1,c,V]
        probs = torch.softmax(logits.masked_fill_(hidden, fill), dim=-1)
        if query_valid is not None:
            probs = probs * query_valid[:, None, None, start:stop, None]
        if want_output:
            out = torch.matmul(probs.view(batch, kv_heads, group * rows, visible), vf[:, :, :visible])
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
