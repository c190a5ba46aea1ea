"""`PrunedLayer`: one full-attention layer of a `PrunedCache`, as transformers sees it.

The layer is the contract with transformers (`update`, `get_seq_length`, `get_mask_sizes`, batch
operations, `reset`) plus the glue of one forward (`attend`). What it holds has named homes:
slot storage in `SlotStore` (kvpress/slots.py), the attention path in kvpress/attention_path.py, the
policy's state in `State` objects (kvpress/state.py) and the eviction step in kvpress/eviction.py.
It holds no reference to its cache: what eviction needs from the cache (policy chain, slack,
quantization, its place among the pruned layers, cross-layer state) is its `LayerContext`
(kvpress/context.py), handed to it when it is built.

What policies read of a layer: `keys`, `values`, `valid` (and its negation `invalid`), `positions`, `real_seen`, `seen`, counts
(`num_slots`, `num_heads`, `batch`, `head_dim`, `itemsize`), `budget`, `scores`, `state(policy)`,
`shared_state(policy)`, `context.pruned_index` / `context.pruned_count`.

The layer's logical length `seen` is what transformers sees as the sequence length; the physical
window is described to the mask code as `[seen - P, seen + q)` (integration-notes.md 1.4).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from kvpress import attention_path, hook, masks
from kvpress.cache_report import LayerReport
from kvpress.context import LayerContext
from kvpress.eviction import after_attention, fit_quantized, make_room
from kvpress.signals import DECODE, PREFILL
from kvpress.slots import SlotStore, TokenLayout
from kvpress.state import Allocation, ScoreState, State


class PrunedLayer(DynamicLayer):
    """One full-attention layer of a `PrunedCache` (or a sliding-window layer of a model whose every
    layer slides, with the window as one more eviction rule): slot storage, the policy's per-layer
    state, and the eviction step after attention."""

    is_croppable = False

    def __init__(self, context: LayerContext, layer_idx: int, sliding_window: int | None = None):
        super().__init__()
        self.context = context
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self._clear()

    def rebind(self, context: LayerContext, sliding_window: int | None) -> None:
        """Once, when the cache learns the model's layer types after this layer was built: its place
        among the pruned layers and its sliding window."""
        self.context = context
        self.sliding_window = sliding_window

    def _clear(self) -> None:
        self.slots: SlotStore | None = None
        self.states: dict[int, State] = {}  # depth of a policy in the cache's chain -> its state here
        self.allocation: Allocation | None = None  # sizes chosen by a cross-layer allocation
        self.seen = 0
        self.evictions = 0
        self.tokens_since_eviction = 0  # tokens written since the last eviction (host-side: slack, storage bounds)
        self.keys = self.values = None
        self.is_initialized = False
        self.layout: TokenLayout | None = None  # the next forward's tokens, when a policy lays them out

    # ---- what policies read ----
    keys = property(lambda self: self.slots.keys if self.slots is not None else None, lambda self, v: None)
    values = property(lambda self: self.slots.values if self.slots is not None else None, lambda self, v: None)
    valid = property(lambda self: self.slots.valid)
    invalid = property(lambda self: self.slots.invalid)  # ~valid, computed once while validity is unchanged
    positions = property(lambda self: self.slots.positions)
    real_seen = property(lambda self: self.slots.real_seen)
    store = property(lambda self: self.slots.quantized if self.slots is not None else None)
    num_slots = property(lambda self: 0 if self.slots is None else self.slots.num_slots)
    num_heads = property(lambda self: self.slots.num_heads)
    batch = property(lambda self: self.slots.batch)
    device = property(lambda self: self.slots.valid.device, lambda self, v: None)
    head_dim = property(lambda self: self.slots.head_dim)
    itemsize = property(lambda self: self.slots.itemsize)
    heads_off = property(lambda self: self.slots.heads_off)  # [B, Hkv] bool or None

    @property
    def kept_slots(self) -> int:
        """The most slots any (row, KV head) holds (a host sync: for reports and tests, not the hot path)."""
        return int(self.valid.sum(-1).max()) if self.num_slots else 0

    @property
    def budget(self) -> int | float:
        """The budget the cache's policy chain enforces on this layer."""
        return self.context.policy.budget_of(self)

    @property
    def scores(self) -> torch.Tensor | None:
        """The running attention mass of the policy chain (`[B, Hkv, P]`), None if it needs none."""
        policy = self.context.policy
        return policy.raw_scores(self) if policy is not None else None

    def state(self, policy) -> State | None:
        """The per-layer state of `policy` (one of the cache's policy chain), None if it keeps none."""
        return self.states.get(self.context.depth_of(policy))

    def shared_state(self, policy) -> State:
        """The cross-layer state of `policy` in this layer's cache."""
        return self.context.shared_state(policy, self)

    def switch_off_heads(self, heads: torch.Tensor) -> None:
        """Stop storing the KV heads marked in `heads [B, Hkv]` (SpAtten's head pruning)."""
        self.slots.switch_off_heads(heads)

    def score_state(self) -> ScoreState | None:
        return next((s for s in self.states.values() if isinstance(s, ScoreState)), None)

    # ---- transformers' layer contract ----
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.slots = SlotStore(key_states, value_states)
        self.dtype = key_states.dtype
        for depth, member in enumerate(self.context.chain):
            state = member.new_layer_state(self)
            if state is not None:
                self.states[depth] = state
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        make_room(self, q)
        self.tokens_since_eviction += q
        keys, values = self.slots.append(key_states, value_states, self.layout)
        for state in self.states.values():
            state.append_slots(q, self.slots.capacity)
        self.seen += q if self.layout is None else self.layout.seen_new
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        slots = self.num_slots
        return slots + query_length, self.seen - slots

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(
                f"crop({tokens_to_remove}): a PrunedCache cannot be cropped, evicted tokens are gone. "
                "Assisted/speculative decoding and other callers of crop are not supported; crop(0) is a no-op."
            )

    def reset(self) -> None:
        self._clear()

    def map_tensors(self, fn) -> None:
        """Apply a batch operation or a device move to the slots and every policy state."""
        if not self.is_initialized:
            return
        self.slots.map_tensors(fn)
        for state in self.states.values():
            state.map_tensors(fn)
        if self.allocation is not None:
            self.allocation.map_tensors(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_tensors(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_tensors(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_tensors(lambda t: t[indices, ...])

    # ---- one forward (called by the attention hook) ----
    def attend(self, original, module, query, key, value, attention_mask, *args, custom_mask: bool = False,
               **kwargs):
        """`custom_mask`: `attention_mask` is a 4-D mask the caller built (not transformers from this
        cache's `get_mask_sizes`); it is honoured or refused (`kvpress.masks.custom_mask_validity`)."""
        self._check_call(module, kwargs)
        batch, _, q, _ = query.shape
        phase = PREFILL if q > 1 else DECODE
        # generate extends the mask with ones while decoding: one new token is always real
        layout, self.layout = self.layout, None
        new_valid = None
        if q > 1 and layout is None:
            new_valid = masks.new_token_validity(attention_mask, batch, q)  # [B, q] or None
        if new_valid is not None:
            if self.context.pruned_index == 0:  # the same mask reaches every layer: checked once (a sync)
                rows = masks.padded_on_the_right(new_valid, self.slots.real_seen_before)
                if bool(rows.any()):
                    raise ValueError(
                        f"PrunedCache: batch rows {rows.nonzero().flatten().tolist()} are padded on the right "
                        "(they end in padding after real tokens); positions and eviction windows count from the end of each "
                        "row, so pad on the left: tokenizer.padding_side = 'left'.")
            self.slots.mark_new_tokens(new_valid)
        policy = self.context.policy
        if self.context.appending:  # compressed once: nothing to score, the policy's state is left as it is
            policy = None
        request = policy.request(phase) if policy is not None else None
        output, signals = attention_path.attend(self, original, module, query, key, value, attention_mask,
                                                args, kwargs, request, phase, new_valid, layout, custom_mask)
        if policy is not None:
            policy.update(self, signals)
        after_attention(self, phase)
        self.slots.end_forward(self.context.storage_for(self))
        fit_quantized(self)
        self.slots.release_views()  # views of the used slots are held during a forward only
        for state in self.states.values():
            state.release_views()
        return output

    def _check_call(self, module, kwargs) -> None:
        if module.training or kwargs.get("dropout", 0.0):
            raise NotImplementedError("PrunedCache is for inference: call model.eval() (dropout must be 0).")
        window = kwargs.get("sliding_window")
        if window is not None and window != self.sliding_window:
            raise NotImplementedError(
                f"Layer {self.layer_idx} uses sliding-window attention (window {window}) but is a pruned full-attention "
                "layer: pass PrunedCache(policy, config=model.config) so the cache knows the layer types."
            )
        if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
            raise NotImplementedError("PrunedCache supports causal decoder attention only.")
        if getattr(getattr(module, "config", None), "alibi", False):
            raise NotImplementedError(
                "ALiBi models (config.alibi=True) add their position bias to the attention mask, which PrunedCache "
                "rebuilds from the kept slots after an eviction. Supported model families: "
                + ", ".join(hook.SUPPORTED_FAMILIES))
        if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
            raise NotImplementedError(
                "Attention sinks / position biases are not supported. Supported model families: "
                + ", ".join(hook.SUPPORTED_FAMILIES))
        impl = getattr(getattr(module, "config", None), "_attn_implementation", "eager")
        if impl not in hook.SUPPORTED_IMPLEMENTATIONS:
            raise NotImplementedError(
                f"attn_implementation={impl!r} is not supported by PrunedCache; use one of "
                + ", ".join(hook.SUPPORTED_IMPLEMENTATIONS))

    def report(self) -> LayerReport:
        """Tokens seen, slots kept (the most any KV head holds), bytes allocated (storage capacity and
        policy state included), evictions."""
        held = kept = capacity = dynamic = 0
        if self.is_initialized:
            held = self.slots.nbytes + sum(state.nbytes for state in self.states.values())
            kept = self.kept_slots
            capacity = self.slots.capacity
            slots = self.slots
            tokens = self.seen if self.sliding_window is None else min(self.seen, self.sliding_window - 1)
            dynamic = slots.batch * slots.num_heads * tokens * slots.head_dim * 2 * slots.itemsize
        return LayerReport(self.layer_idx, self.seen, kept, held, self.evictions, capacity=capacity,
                           dynamic_bytes=dynamic)
