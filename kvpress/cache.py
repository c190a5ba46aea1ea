"""`PrunedCache`: a transformers `Cache` whose full-attention layers evict tokens with a policy.

Each `PrunedLayer` holds keys and values `[B, Hkv, P, D]` (RoPE applied, slots in temporal order) and,
aligned with them, `valid [B, Hkv, P]` (False for padding and for surplus slots of rows or heads that
keep fewer tokens), `positions [B, Hkv, P]` (index of the token among the row's real tokens, -1 for
padding) and `scores [B, Hkv, P]` (the policy's running score). The layer's logical length `seen`
is what transformers sees as the sequence length; the physical window is described to the mask code
as `[seen - P, seen + q)` (integration-notes.md 1.4). Eviction happens after attention, in
`PrunedLayer.attend`, never in `update`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    DynamicLayer,
    get_layer_types_and_kwargs,
)

from kvpress import attention as hook
from kvpress.policy import DECODE, PREFILL, AttentionRequest, EvictionPolicy, Selection
from kvpress.quant import KVQuant, QuantizedStore
from kvpress.report import CacheReport, LayerReport
from kvpress.signals import grouped_attention, row_weights
from kvpress.triton_kernels.compaction import compact_slots

PER_SLOT = ("keys", "values", "valid", "positions", "scores")


def new_token_validity(mask: torch.Tensor | None, batch: int, q: int) -> torch.Tensor | None:
    """`[B, q]` bool: which of the `q` new tokens are real, read from the model's mask (the new tokens
    are its last `q` columns; a real key is visible from its own query row). None: all real."""
    if mask is None:
        return None
    if mask.dim() == 2:  # flash-attention: (B, kv) with 1 = real
        return mask[:, -q:].bool()
    cols = mask[..., -q:]
    visible = cols if cols.dtype == torch.bool else cols > torch.finfo(cols.dtype).min / 2
    return visible.any(dim=-2).any(dim=1).expand(batch, q)  # [B, q]


class PrunedLayer(DynamicLayer):
    """One full-attention layer of a `PrunedCache`: slot storage plus the eviction step."""

    is_croppable = False

    def __init__(self, cache: PrunedCache, layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = self.valid = self.positions = self.scores = None
        self.real_seen: torch.Tensor | None = None  # [B] real tokens seen per row
        self.store: QuantizedStore | None = None  # quantized keys/values (kvpress/quant.py); keys/values are then meta between forwards
        self.seen = 0
        self.evictions = 0
        self.may_hold_invalid = False  # host-side: some slot may be padding or a masked surplus slot
        self.dropped_heads: torch.Tensor | None = None  # [B, Hkv] heads that store and attend nothing
        self.attention_output: torch.Tensor | None = None  # [B, q, Hq, Dv] while the policy selects
        self.is_initialized = False

    # ---- transformers' layer contract ----
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads = key_states.shape[:2]
        device = key_states.device
        self.keys = key_states.new_empty(batch, heads, 0, key_states.shape[-1])
        self.values = value_states.new_empty(batch, heads, 0, value_states.shape[-1])
        self.valid = torch.ones(batch, heads, 0, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch, heads, 0, dtype=torch.long, device=device)
        self.scores = torch.zeros(batch, heads, 0, dtype=torch.float32, device=device)
        self.real_seen = torch.zeros(batch, dtype=torch.long, device=device)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, q = key_states.shape[:3]
        if self.store is not None:
            self.keys, self.values = self.store.append(key_states, value_states)
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        # provisional: every new token real; `attend` corrects this when the mask shows padding
        new_valid = self.valid.new_ones(batch, heads, q)
        if self.dropped_heads is not None:
            new_valid &= ~self.dropped_heads[..., None]
        offsets = torch.arange(q, device=self.real_seen.device) if q > 1 else 0
        new_positions = (self.real_seen[:, None] + offsets)[:, None, :].expand(batch, heads, q)
        self.valid = torch.cat([self.valid, new_valid], dim=-1)
        self.positions = torch.cat([self.positions, new_positions], dim=-1)
        self.scores = torch.cat([self.scores, self.scores.new_zeros(batch, heads, q)], dim=-1)
        self.seen += q
        self._new_tokens = q
        self._real_before = self.real_seen
        self.real_seen = self.real_seen + q
        hook.leave_handoff(hook.Handoff(self.cache, self.cache.forward_index, self, self.keys))
        return self.keys, self.values

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

    def _apply_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        for name in self._dense_tensor_names():
            setattr(self, name, fn(getattr(self, name)))
        if self.dropped_heads is not None:
            self.dropped_heads = fn(self.dropped_heads)
        if self.store is not None:
            self.store.apply_batch(fn)
            self.keys, self.values = self.store.placeholders()

    def _dense_tensor_names(self) -> tuple[str, ...]:
        """Per-row tensors the layer holds itself; with quantization, keys and values live in the store."""
        names = PER_SLOT[2:] if self.store is not None else PER_SLOT
        return names + ("real_seen",)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_batch(lambda t: t[indices, ...])

    # ---- slot bookkeeping ----
    @property
    def num_slots(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def num_heads(self) -> int:
        return self.keys.shape[1]

    def _mark_positions(self, new_valid: torch.Tensor) -> None:
        """Set validity and real-token positions of the newest `q` slots from `new_valid [B, q]`
        (False for padding), once `attend` has read it from the model's mask."""
        q = self._new_tokens
        offsets = torch.cumsum(new_valid.long(), dim=-1) - 1  # [B, q]
        positions = torch.where(new_valid, self._real_before[:, None] + offsets, -1)
        self.valid[..., -q:] = new_valid[:, None, :]
        if self.dropped_heads is not None:
            self.valid[..., -q:] &= ~self.dropped_heads[..., None]
        self.positions[..., -q:] = positions[:, None, :]
        self.real_seen = self._real_before + new_valid.sum(-1)

    def drop_heads(self, heads: torch.Tensor) -> None:
        """Stop storing and attending the KV heads where `heads [B, Hkv]` is True (SpAtten's head
        pruning): their slots become invalid, later tokens are not stored in them, and their query
        heads output zeros (a row that sees no valid slot outputs zeros)."""
        self.dropped_heads = heads if self.dropped_heads is None else self.dropped_heads | heads
        self.valid = self.valid & ~self.dropped_heads[..., None]
        self.may_hold_invalid = True

    def _compact(self, selection: Selection) -> None:
        index = selection.indices  # [B, Hkv, K]
        # one Triton launch on CUDA, torch gathers elsewhere
        self.keys, self.values, self.positions, self.scores, _ = compact_slots(
            self.keys, self.values, self.positions, self.scores, index)
        self.valid = selection.valid
        if self.store is not None:
            self.store.compact(index)
        self.evictions += 1
        if not self.may_hold_invalid:
            self.may_hold_invalid = bool((~selection.valid).any())

    # ---- the attention step (called by the wrapper) ----
    def attend(self, original, module, query, key, value, attention_mask, *args, **kwargs):
        if not self.cache.types_known:
            holder = self.cache.adopt_model_config(module.config, self)
            if holder is not self:  # a sliding-window layer: transformers' own attention, never pruned
                return original(module, query, key, value, attention_mask, *args, **kwargs)
        self._check_call(module, kwargs)
        batch, _, q, _ = query.shape
        phase = PREFILL if q > 1 else DECODE
        # generate extends the mask with ones while decoding: one new token is always real
        new_valid = new_token_validity(attention_mask, batch, q) if q > 1 else None  # [B, q] or None
        if new_valid is not None:
            self._mark_positions(new_valid)
            self.may_hold_invalid = self.may_hold_invalid or not bool(new_valid.all())
        policy = self.cache.policy
        request = policy.request(phase) if policy is not None else None
        clean = not self.may_hold_invalid and (attention_mask is None or attention_mask.shape[-1] == key.shape[-2])
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        softcap = kwargs.get("softcap")

        mass = None
        if clean and (request is None or request.rows is not None):
            output = original(module, query, key, value, attention_mask, *args, **kwargs)
            if request is not None:  # window rows only: recompute them, not the whole attention
                rows = min(request.rows, q)
                weights = row_weights(rows, None, request.decay, key.device)
                _, mass = grouped_attention(query[:, :, -rows:], key, value, self.valid, scaling=scaling,
                                            softcap=softcap, weights=weights, want_output=False)
        else:
            weights = row_weights(q, request.rows, request.decay, key.device) if request else None
            # padding query rows output zeros and add no mass (a dropped head's slots are invalid
            # too, so validity is read from the mask, not from the slots)
            out, mass = grouped_attention(query, key, value, self.valid, scaling=scaling, softcap=softcap,
                                          query_valid=new_valid, weights=weights)
            output = (out, None)

        if policy is not None:
            self._absorb(mass, request, q)
            if policy.evicts_during(phase):
                self.attention_output = output[0]  # policies may read it while they select (SpAtten)
                selection = policy.select(self, self.cache.slack)
                self.attention_output = None
                if selection is not None:
                    self._compact(selection)
        self._store_kept_slots()
        return output

    def _store_kept_slots(self) -> None:
        """With quantization: after the first forward's eviction, move the kept slots into quantized
        storage (score first, then quantize); after every forward, quantize residual slots whose group
        filled, and release the dequantized tensors attention read (meta placeholders keep the shape)."""
        if self.store is None:
            quant = self.cache.quantization_for(self)
            if quant is None:
                return
            self.store = QuantizedStore(quant, self.keys, self.values)
        else:
            self.store.flush()
        self.keys, self.values = self.store.placeholders()

    def _absorb(self, mass: torch.Tensor | None, request: AttentionRequest | None, q: int) -> None:
        if mass is None:
            return
        if not request.accumulate:
            self.scores = mass
        elif request.decay == 1.0:
            self.scores = self.scores + mass
        else:
            self.scores = self.scores * request.decay ** q + mass

    def _check_call(self, module, kwargs) -> None:
        if module.training or kwargs.get("dropout", 0.0):
            raise NotImplementedError("PrunedCache is for inference: call model.eval() (dropout must be 0).")
        if kwargs.get("sliding_window") is not None:
            raise NotImplementedError(
                f"Layer {self.layer_idx} uses sliding-window attention but is a pruned layer: pass "
                "PrunedCache(policy, config=model.config) so sliding layers keep transformers' own cache."
            )
        if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
            raise NotImplementedError("PrunedCache supports causal decoder attention only.")
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
        held = sum(getattr(self, name).nbytes for name in self._dense_tensor_names()) if self.is_initialized else 0
        held += self.store.nbytes if self.store is not None else 0
        return LayerReport(self.layer_idx, self.seen, self.num_slots, held, self.evictions)


def _layer_report(index: int, layer) -> LayerReport:
    if isinstance(layer, PrunedLayer):
        return layer.report()
    held = 0 if getattr(layer, "keys", None) is None else layer.keys.nbytes + layer.values.nbytes
    kept = 0 if getattr(layer, "keys", None) is None else layer.keys.shape[-2]
    return LayerReport(index, layer.get_seq_length(), kept, held, 0, pruned=False)


class PrunedCache(Cache):
    """A `transformers.Cache` that evicts tokens per layer with `policy`, at the end of prefill and
    while decoding: `model.generate(ids, cache=PrunedCache(H2O(budget=256)))`.

    policy: any `kvpress.policies` policy, or None to never evict (identical to `DynamicCache`).
    config: the model config, to know up front which layers are sliding-window layers (those keep
        transformers' own layer and are never pruned). Without it the types are read from the model
        at its first forward.
    slack: slots a layer may exceed its budget by before it compacts; compaction then goes back to
        the budget. 0 evicts at every step (H2O's definition); a larger slack amortises the copy.
    quantization: `KVQuant(bits, group_size, residual)` to store kept slots quantized (KIVI-style,
        kvpress/quant.py); attention and policies read the dequantized slots. Without it, a policy that
        defines `quantization_for(layer)` (`QuantizedPruning`) chooses the storage.
    """

    def __init__(self, policy: EvictionPolicy | None = None, *, config=None, slack: int = 0,
                 quantization: KVQuant | None = None):
        if policy is not None and not isinstance(policy, EvictionPolicy):
            raise ValueError(f"policy must be a kvpress policy or None, got {type(policy).__name__}")
        if not isinstance(slack, int) or slack < 0:
            raise ValueError(f"slack must be an int >= 0, got {slack!r}")
        super().__init__(layers=[])
        self.policy = policy
        self.slack = slack
        if quantization is not None and not isinstance(quantization, KVQuant):
            raise ValueError(f"quantization must be a kvpress.KVQuant or None, got {type(quantization).__name__}")
        self.quantization = quantization
        self.forward_index = 0
        self._last_layer = -1
        self.types_known = False
        if config is not None:
            self._build_layers(config)

    def _build_layers(self, config) -> None:
        layer_types, per_layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        layers = []
        for index, (kind, kwargs) in enumerate(zip(layer_types, per_layer_kwargs)):
            if kind == "full_attention":
                layers.append(PrunedLayer(self, index))
            elif kind in DYNAMIC_LAYER_TYPE_MAPPING:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs))
            else:
                raise NotImplementedError(f"layer type {kind!r} (layer {index}) is not supported by PrunedCache")
        self.layers = layers
        self.types_known = True

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx <= self._last_layer:
            self.forward_index += 1
        self._last_layer = layer_idx
        while len(self.layers) <= layer_idx:
            self.layers.append(PrunedLayer(self, len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def adopt_model_config(self, config, layer: PrunedLayer):
        """At the first forward without `config=`: build the layer types from the model's config.
        Returns the layer that now holds `layer`'s tokens (a sliding layer if layer 0 is sliding)."""
        self.types_known = True
        existing = list(self.layers)
        self._build_layers(config)
        for index, old in enumerate(existing):
            new = self.layers[index]
            if isinstance(new, PrunedLayer):
                self.layers[index] = old
            elif old.is_initialized:
                new.update(old.keys, old.values)
        return self.layers[layer.layer_idx]

    def quantization_for(self, layer: PrunedLayer) -> KVQuant | None:
        """The storage of `layer`: the cache's `quantization`, else the policy's choice, else None."""
        if self.quantization is not None:
            return self.quantization
        choose = getattr(self.policy, "quantization_for", None)
        return choose(layer) if choose is not None else None

    @property
    def is_compileable(self) -> bool:
        return False

    def report(self) -> CacheReport:
        """Per-layer tokens seen, slots kept, bytes held and evictions; totals and kept/seen ratio."""
        return CacheReport([_layer_report(i, layer) for i, layer in enumerate(self.layers)])
