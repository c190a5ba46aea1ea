"""Storage sizing from host-side counts: how many slots a layer's storage holds and how it grows,
without a device-to-host sync.

A layer's storage has capacity beyond the slots in use, so a decoding step writes its token in place.
After a compaction the capacity is the kept width, the cache's slack and `1/HEADROOM` of the width
(the holes and new tokens of the decoding steps until the next squeeze); storage that only grows (no
policy, or a policy that has not evicted yet) grows to `1/GROWTH` more than it needs. Bounds of the
slots a (row, head) may hold come from the policy's host-side `slot_bound` (which policies that set
their own counts raise) and the tokens written since the last eviction.
"""

from __future__ import annotations

from kvpress.budgets import host_slots_for_budget

HEADROOM = 20  # free slots after a compaction: 1/20 of the width kept (at most 1.05x plus the slack), a
# squeeze (one gather) every width/20 steps
GROWTH = 20  # a full buffer grows to 1/20 more than it needs: at most 1.05x the bytes in use, and a copy
# of the buffer every need/20 steps (DynamicCache copies its whole cache at every step)


def uniform_slot_bound(layer) -> int:
    """The slots any (row, head) keeps under the chain's budget, or the cross-layer allocation plus what
    the uniform budget has grown by since it."""
    uniform = host_slots_for_budget(layer.budget, layer.seen)
    if layer.allocation is None:
        return uniform
    return min(layer.seen, layer.allocation.most + max(0, uniform - layer.allocation.uniform_most))


def grown_capacity(need: int, exact: bool) -> int:
    """The capacity a full buffer grows to when it needs `need` slots: exactly `need` (prefill chunks, a
    hard memory budget), else `need` and 1/GROWTH more, so that storage that only grows (no policy)
    holds at most 1.05x the bytes in use at every step."""
    return need if exact else need + need // GROWTH


def room_after(layer, width: int) -> int:
    """Capacity for `width` kept slots, the cache's slack, and 1/HEADROOM of the width for the holes and
    new tokens of the decoding steps until the next squeeze: persistent storage stays within 1.05x of
    the slots kept (plus the slack the user asked for), and a squeeze (one gather) comes every
    `width / HEADROOM` steps."""
    policy = layer.context.policy
    if policy is not None and policy.exact_storage:
        return width
    return width + layer.context.slack + max(1, -(-width // HEADROOM))


def head_room(layer) -> int:
    """Rows per live KV head of per-head storage for the tokens of the next decoding steps: the slack and
    1/HEADROOM of the uniform budget (`room_after`'s rule, per head)."""
    if layer.context.policy.exact_storage:
        return 0
    uniform = host_slots_for_budget(layer.budget, layer.seen)
    return layer.context.slack + max(1, -(-uniform // HEADROOM))


def stores_per_head(layer) -> bool:
    """Whether `layer` stores its keys and values per head (the policy's choice; never quantized ones)."""
    policy = layer.context.policy
    return policy is not None and layer.slots.quantized is None and policy.per_head_storage(layer)



def held_bound(layer) -> int:
    """A host-side bound of the valid slots any (row, head) holds: the policy's bound at the last
    eviction plus the tokens written since (and the sliding window's, for a sliding layer)."""
    policy = layer.context.policy
    bound = layer.num_slots if policy is None else policy.slot_bound(layer) + layer.tokens_since_eviction
    if layer.sliding_window is not None:
        bound = min(bound, layer.sliding_window - 1)
    return bound
