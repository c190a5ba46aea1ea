"""Which path computes one forward's attention over a pruned layer, and the signals its policy asked for.

`attend` chooses: the model's own attention function (bit-identical to `DynamicCache`) when the stored
slots are an exact causal prefix that the model's mask describes, `quantized_attention` over a
KIVI-quantized layer, the fused decode kernel (Triton) that folds a decoding step's mass into the
running score, else `grouped_attention` with a mask built from slot validity and positions. The maths
of those paths is in `kvpress.reference_attention`, the mask checks in `kvpress.masks`.
"""

from __future__ import annotations

import math

import torch

from kvpress.masks import custom_mask_validity, mask_has_structure, mask_hides_padding
from kvpress.reference_attention import grouped_attention, quantized_attention
from kvpress.signals import AttentionRequest, Signals
from kvpress.triton_kernels import use_triton
from kvpress.triton_kernels.decode_attention import decode_attention

# backend of the fused decode step; tests set "triton" to run the kernel in Triton's CPU interpreter
FUSED_DECODE_BACKEND = "auto"


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


def attend(layer, original, module, query, key, value, attention_mask, args, kwargs,
           request: AttentionRequest | None, phase: str, new_valid: torch.Tensor | None, layout=None,
           custom_mask: bool = False):
    """One forward's attention for a pruned layer, and the signals its policy asked for.

    The model's own function runs when the slots are an exact causal prefix its mask describes (no slot
    was ever invalid, the mask has this layer's columns, and a sliding-window layer never evicted out
    of order) and the policy needs no signal over every row; window rows are then recomputed from the
    last queries. Otherwise `grouped_attention` runs with validity (and the sliding window) from the
    slots; with a `TokenLayout` (kvpress/slots.py) it also runs with the layout's validity and causal
    order by position. A `custom_mask` (a 4-D mask the caller built) is honoured or refused
    (`custom_mask_validity`). Returns `(output as the model's function returns it, Signals)`."""
    q = query.shape[2]
    slots = layer.slots
    window = layer.sliding_window
    if layout is not None and custom_mask:
        raise ValueError(
            f"layer {layer.layer_idx}: a custom 4-D attention mask cannot be honoured by a policy that lays out "
            "the tokens itself (LazyLLM); pass a 2-D padding mask.")
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
    valid = slots.valid
    if custom_mask:
        valid = custom_mask_validity(attention_mask, valid, slots.exact_prefix, layer.layer_idx, q)
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")

    mass = None
    if slots.quantized is not None:
        weights = row_weights(q, request.rows, request.decay, query.device) if request else None
        out, mass = quantized_attention(query, slots.quantized, valid, scaling=scaling, softcap=softcap,
                                        query_valid=new_valid, weights=weights, positions=slots.positions,
                                        window=window)
        return (out, None), Signals(phase=phase, q=q, request=request, mass=mass, output=out, query=query,
                                    module=module)
    score_state = layer.score_state() if q == 1 and request is not None and request.accumulate else None
    if score_state is not None and window is None and fused_decode_fold(query):
        # the fused decode kernel folds this step's mass into the running score in place
        weights = row_weights(1, request.rows, request.decay, key.device)
        running = score_state.scores.contiguous()  # the kernel folds a dense buffer (a copy when capacity > used)
        out, running = decode_attention(query, key, value, valid, scaling=scaling, softcap=softcap,
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
            _, mass = grouped_attention(query[:, :, -rows:], key, value, valid, scaling=scaling,
                                        softcap=softcap, query_valid=row_valid, weights=weights,
                                        want_output=False, positions=slots.positions, window=window)
    else:
        weights = None
        if request is not None:  # one row of age 0 weighs exactly 1 (`row_weights`): no tensor needed
            one_row = q == 1 and (request.rows is None or request.rows >= 1)
            weights = 1.0 if one_row else row_weights(q, request.rows, request.decay, key.device)
        # padding query rows output zeros and add no mass (a switched-off head's slots are invalid
        # too, so validity is read from the mask, not from the slots); while decoding, the new token
        # makes every head live unless heads were switched off or a custom mask hides slots
        heads_live = q == 1 and slots.heads_off is None and not custom_mask
        # the slots' own negated validity, which eviction reads after this step too
        invalid = slots.invalid if q == 1 and window is None and not custom_mask else None
        out, mass = grouped_attention(query, key, value, valid, scaling=scaling, softcap=softcap,
                                      query_valid=new_valid, weights=weights,
                                      positions=slots.positions if window is not None else None,
                                      window=window, heads_live=heads_live, slot_invalid=invalid)
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
