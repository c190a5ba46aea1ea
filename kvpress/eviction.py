"""The eviction step: after a layer's attention, or across layers at the end of prefill.

Per layer (most policies): right after the layer attended, the policy folds its signals into its
state and, when the layer holds more than its counts plus the cache's slack, selects; the layer then
compacts slots and every policy state together.

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

from typing import TYPE_CHECKING

import torch

from kvpress.policy import PREFILL, Selection, top_k_selection
from kvpress.state import Allocation

if TYPE_CHECKING:  # pragma: no cover
    from kvpress.cache import PrunedCache
    from kvpress.layer import PrunedLayer


def after_attention(layer: PrunedLayer, phase: str) -> None:
    """Evict what `layer`'s sliding window (first) and policy (then) no longer keep after this forward."""
    cache = layer.cache
    policy = cache.policy
    if layer.sliding_window is not None:
        selection = within_window(layer)
        if selection is not None:
            compact(layer, selection)
    if policy is None or not policy.evicts_during(phase):
        return
    if phase == PREFILL and policy.allocates_across_layers:
        cache.prefill_pending = True
        return
    selection = policy.select(layer, cache.slack)
    if selection is not None:
        compact(layer, selection)


def compact(layer: PrunedLayer, selection: Selection) -> None:
    """Keep `selection` in the slots and in every policy state of the layer."""
    index = selection.indices
    score_state = layer.score_state()
    kept_scores = layer.slots.gather(index, selection.valid, score_state.scores if score_state else None)
    for state in layer.states.values():
        if state is score_state:
            state.scores = kept_scores
        else:
            state.gather_slots(index)
    layer.evictions += 1
    if layer.cache.policy is not None:
        layer.cache.policy.compacted(layer, selection)


def within_window(layer: PrunedLayer) -> Selection | None:
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


def allocate_across_layers(cache: PrunedCache) -> None:
    """The cross-layer stage: the policy chooses every pruned layer's counts, every layer compacts."""
    cache.prefill_pending = False
    policy = cache.policy
    layers = cache.pruned_layers()
    counts = policy.allocate(layers)
    if len(counts) != len(layers):
        raise ValueError(f"{type(policy).__name__}.allocate returned {len(counts)} counts for {len(layers)} layers")
    for layer, layer_counts in zip(layers, counts):
        layer.allocation = None  # a new turn re-allocates from the uniform budget
        uniform = policy.keep_counts(layer)
        layer.allocation = Allocation(counts=layer_counts.to(torch.long), uniform=uniform)
        selection = policy.select(layer, 0, counts=layer.allocation.counts)
        if selection is not None:
            compact(layer, selection)
