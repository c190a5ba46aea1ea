"""The eviction step: after a layer's attention, or across layers at the end of prefill.

Per layer (most policies): right after the layer attended, the policy folds its signals into its
state and evicts. At prefill (several new tokens) it selects when the layer holds more than its
counts plus the cache's slack, and the layer compacts slots and every policy state together in one
gather, into storage sized for the decoding that follows. While decoding (one new token) the
eviction makes no host sync and moves no data: every `slack + 1` steps (a host-side count) the policy
ranks the slots and the ones it does not keep become holes (`SlotStore.drop`); the layer squeezes
the holes out with one gather only when its storage is full (`make_room`). Quantized layers drop in
place at every eviction once their store exists (prefill chunks included); after the forward's flush,
`fit_quantized` cuts each region (quantized, residual) to the slots a (row, head) may hold, sized from
host counts, so a quantized decoding step makes no sync either. When the policy's heads keep
different numbers of slots (`per_head_storage`), every compaction lays keys and values out per head
(kvpress/ragged.py), sized at prefill from the counts kept and while decoding from host-side bounds.

Across layers (policies with `allocates_across_layers`): at prefill every layer attends and folds its
signals but keeps every slot; when the prompt has ended (the first decoding step, or an explicit
`PrunedCache.end_prefill()`), the policy chooses `[B, Hkv]` counts for every layer from all their
states, each layer compacts to its counts and keeps them, grown as the uniform budget grows, while
decoding. A chunked prefill therefore defers to the end of the prompt, not of each chunk.

Sliding-window layers (a model whose every layer slides) drop any token older than the window
whatever its score, so they hold at most `window - 1` tokens between forwards, as transformers'
`DynamicSlidingWindowLayer` does.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from kvpress.budgets import host_slots_for_budget
from kvpress.ragged import HeadRoom
from kvpress.selection import Selection, keep_mask, one_victim, select, top_k_selection, valid_first_order
from kvpress.signals import DECODE, PREFILL
from kvpress.sizing import grown_capacity, head_room, held_bound, room_after, stores_per_head
from kvpress.state import Allocation

if TYPE_CHECKING:  # pragma: no cover
    from kvpress.policy import EvictionPolicy


def after_attention(layer, phase: str) -> None:
    """Evict what `layer`'s sliding window (first) and policy (then) no longer keep after this forward."""
    context = layer.context
    policy = context.policy
    # quantized storage is kept by `fit_quantized` after the forward's flush, so it drops in place too
    in_place = phase == DECODE or layer.slots.quantized is not None
    if layer.sliding_window is not None and layer.seen >= layer.sliding_window:
        if in_place:
            oldest = layer.real_seen[:, None, None] - (layer.sliding_window - 1)
            layer.slots.drop(layer.positions >= oldest)
        else:
            selection = within_window(layer)
            if selection is not None:
                compact(layer, selection, capacity=room_after(layer, selection.indices.shape[-1]))
    if policy is None or not policy.evicts_during(phase) or context.appending:
        return
    if phase == PREFILL and policy.allocates_across_layers:
        context.shared.allocation_pending = True
        return
    if in_place:
        if layer.tokens_since_eviction > context.slack and host_slots_for_budget(layer.budget, layer.seen) < layer.seen:
            victim = one_victim(policy, layer)
            if victim is not None:
                layer.slots.drop_one(*victim)
            else:
                layer.slots.drop(keep_mask(policy, layer))
            layer.tokens_since_eviction = 0
            layer.evictions += 1
            policy.compacted(layer, None)
        return
    selection = select(policy, layer, context.slack)
    if selection is not None:
        compact(layer, selection, capacity=room_after(layer, selection.indices.shape[-1]))
        layer.tokens_since_eviction = 0


def make_room(layer, q: int) -> None:
    """Before `q` new tokens are written: when the storage is full, squeeze the holes out (one gather,
    sized by host-side bounds, no sync), then grow it geometrically if that is not enough. Per-head
    storage is laid out again instead, with room for the `q` tokens."""
    slots = layer.slots
    if slots.quantized is not None or slots.used + q <= slots.capacity:
        return
    policy = layer.context.policy
    # without a policy only a sliding window leaves holes (a model whose every layer slides)
    if not slots.exact_prefix and (policy is not None or layer.sliding_window is not None):
        since = layer.tokens_since_eviction
        width = min(slots.used, held_bound(layer))
        # valid slots first, in slot (temporal) order; a host bound, so no sync
        order = valid_first_order(slots.valid)[..., :width]
        if stores_per_head(layer):
            live = slots.live_heads
            kept = min(live * width, policy.row_bound(layer) + live * since)
            plan = HeadRoom(room=max(head_room(layer), q), live=live, kept=kept)
            compact(layer, Selection(indices=order, valid=slots.valid.gather(-1, order)), count=False, per_head=plan)
            return
        index, _ = order.sort(dim=-1)
        compact(layer, Selection(indices=index, valid=slots.valid.gather(-1, index)), count=False)
    need = slots.used + q
    if need > slots.capacity:
        exact = q > 1 or (policy is not None and policy.exact_storage)
        slots.reserve(grown_capacity(need, exact))


def fit_quantized(layer) -> None:
    """After a quantized layer's forward (its flush included): when a region (quantized or residual)
    has more slots than a (row, head) may hold valid ones, keep that many, valid ones first, in slot
    order, so its holes go; heads that hold fewer keep some holes. Sized from host counts: no sync."""
    slots = layer.slots
    store = slots.quantized
    if store is None:
        return
    bound = held_bound(layer)
    nq, nr = store.quantized_slots, store.residual_keys.shape[-2]
    keep_q, keep_r = min(nq, bound), min(nr, bound)
    if keep_q == nq and keep_r == nr:
        return
    valid = slots.valid
    parts = []
    for start, stop, width in ((0, nq, keep_q), (nq, nq + nr, keep_r)):
        if width == stop - start:
            parts.append(torch.arange(start, stop, device=valid.device).expand(*valid.shape[:2], -1))
            continue
        order = valid_first_order(valid[..., start:stop])[..., :width]
        parts.append(order.sort(dim=-1).values + start)
    index = torch.cat(parts, dim=-1)
    compact(layer, Selection(indices=index, valid=valid.gather(-1, index)), count=False, quantized=keep_q)


def drop_selection(layer, selection: Selection) -> None:
    """Evict from a quantized layer what `selection` does not keep: the slots become holes, which
    `fit_quantized` removes."""
    keep = torch.zeros_like(layer.valid).scatter_(-1, selection.indices, selection.valid)
    layer.slots.drop(keep)
    layer.tokens_since_eviction = 0
    layer.evictions += 1
    layer.context.policy.compacted(layer, None)


def compact(layer, selection: Selection, *, capacity: int | None = None, count: bool = True,
            per_head: HeadRoom | None = None, quantized: int | None = None) -> None:
    """Keep `selection` in the slots and in every policy state of the layer (`count`: an eviction, not
    only a squeeze of holes). A layer stored per head is laid out per head again (`per_head` sizes it;
    by default from the counts kept, a host sync)."""
    if per_head is None and stores_per_head(layer):
        selection = selection.valid_first()
        per_head = HeadRoom(room=head_room(layer), live=layer.slots.live_heads)
    index = selection.indices
    score_state = layer.score_state()
    kept_scores = layer.slots.gather(index, selection.valid, score_state.scores if score_state else None,
                                     capacity=capacity, per_head=per_head, quantized=quantized)
    for state in layer.states.values():
        if state is score_state:
            state.keep_gathered("scores", kept_scores)
        else:
            state.gather_slots(index)
    if count:
        layer.evictions += 1
        if layer.context.policy is not None:
            layer.context.policy.compacted(layer, selection)


def within_window(layer) -> Selection | None:
    """The slots inside the layer's sliding window, or None when every valid slot is: a query at
    position p sees positions above p - window, so after this forward only the last `window - 1` real
    tokens can still be seen."""
    oldest = layer.real_seen[:, None, None] - (layer.sliding_window - 1)  # [B, 1, 1]
    in_window = layer.valid & (layer.positions >= oldest)
    if bool((in_window == layer.valid).all()):
        return None
    counts = in_window.sum(-1)
    return top_k_selection(layer.positions.float(), in_window, in_window, counts,
                           min(int(counts.max()), layer.num_slots))


def allocate_across_layers(policy: EvictionPolicy, layers: list) -> None:
    """The cross-layer stage: `policy` chooses the counts of every pruned layer, every layer compacts.
    It may run outside a forward (`PrunedCache.end_prefill`), so the layers are opened for reading:
    scores that read keys or values (VATP, CAOTE) then see dequantized slots in quantized storage."""
    with contextlib.ExitStack() as opened:
        for layer in layers:
            opened.enter_context(layer.slots.readable())
        _allocate(policy, layers)


def _allocate(policy: EvictionPolicy, layers: list) -> None:
    counts = policy.allocate(layers)
    if len(counts) != len(layers):
        raise ValueError(f"{type(policy).__name__}.allocate returned {len(counts)} counts for {len(layers)} layers")
    for layer, layer_counts in zip(layers, counts):
        layer.allocation = None  # a new turn re-allocates from the uniform budget
        uniform = policy.keep_counts(layer)
        layer_counts = layer_counts.to(torch.long)
        layer.allocation = Allocation(counts=layer_counts, uniform=uniform, most=int(layer_counts.max()),
                                      uniform_most=int(uniform.max()))
        selection = select(policy, layer, 0, counts=layer_counts)
        if selection is not None and layer.slots.quantized is not None:
            drop_selection(layer, selection)
            fit_quantized(layer)
        elif selection is not None:
            compact(layer, selection, capacity=room_after(layer, selection.indices.shape[-1]))
