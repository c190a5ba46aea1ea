"""`PrunedCache`: a transformers `Cache` whose full-attention layers evict tokens with a policy.

The cache owns every piece of state: one `PrunedLayer` per attention layer (slots and the policy's
per-layer state), the policy's cross-layer state, and the pending cross-layer allocation. Reset,
beam reordering, batch selection and device moves therefore cover all of it, and a policy object is
a pure description that many caches can share.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    get_layer_types_and_kwargs,
)

from kvpress import hook
from kvpress.budgets import check_int
from kvpress.cache_report import CacheReport, LayerReport
from kvpress.context import CrossLayerState, LayerContext, depth_in
from kvpress.eviction import allocate_across_layers
from kvpress.layer import PrunedLayer

AFTER_PROMPT_MODES = ("evict", "append")
from kvpress.policy import EvictionPolicy
from kvpress.quant_config import KVQuant
from kvpress.selection import follows_the_budget

SLIDING_TYPES = ("sliding_attention", "chunked_attention")


def _layer_report(index: int, layer) -> LayerReport:
    if isinstance(layer, PrunedLayer):
        return layer.report()
    held = 0 if getattr(layer, "keys", None) is None else layer.keys.nbytes + layer.values.nbytes
    kept = 0 if getattr(layer, "keys", None) is None else layer.keys.shape[-2]
    return LayerReport(index, layer.get_seq_length(), kept, held, 0, pruned=False, dynamic_bytes=held)


class PrunedCache(Cache):
    """A `transformers.Cache` that evicts tokens per layer with `policy`, at the end of prefill and
    while decoding: `model.generate(ids, cache=PrunedCache(H2O(budget=256)))`.

    policy: any `kvpress.policies` policy, or None to never evict (identical to `DynamicCache`).
    config: the model config, to know up front which layers are sliding-window layers. In a hybrid
        model (full and sliding layers) the sliding ones keep transformers' own layer and are never
        pruned; in a model whose every layer slides (Mistral, Phi-3, Qwen2 with `use_sliding_window`),
        every layer is pruned and also drops tokens older than the window. Without `config` the types
        are read from the model at its first forward.
    slack: slots a layer may exceed its budget by before it compacts; compaction then goes back to
        the budget. 0 evicts at every step (H2O's definition); a larger slack amortises the copy.
    quantization: `KVQuant(bits, group_size, residual)` to store kept slots quantized (KIVI-style,
        kvpress/quantized.py); attention and policies read the dequantized slots. Without it, the policy
        chain chooses the storage (`QuantizedPruning`, wherever it stands in the chain).
    after_prompt: "evict" (default) keeps evicting while decoding, so memory stays at the budget however
        long the generation (H2O's setting; long reasoning traces); "append" compresses the prompt once
        and then appends every later token without eviction, as SnapKV, KVzip and NVIDIA's kvpress do
        (one document, many questions: the compressed context stays whole). The prompt ends at the
        first one-token forward, at `end_prefill()`, or when `prefill()` returns; `report()` says which
        mode runs and whether a cross-layer allocation still waits for the end of the prompt.
    """

    def __init__(self, policy: EvictionPolicy | None = None, *, config=None, slack: int = 0,
                 quantization: KVQuant | None = None, after_prompt: str = "evict"):
        if policy is not None and not isinstance(policy, EvictionPolicy):
            got = (f"the class {policy.__name__}; build one: PrunedCache({policy.__name__}(...))"
                   if isinstance(policy, type) else type(policy).__name__)
            raise ValueError(f"policy must be a kvpress policy or None, got {got}")
        if config is not None and not hasattr(config, "get_text_config"):
            raise ValueError(f"config must be the model's transformers config (model.config) or None, "
                             f"got {type(config).__name__}")
        check_int("PrunedCache", "slack", slack, 0)
        if quantization is not None and not isinstance(quantization, KVQuant):
            raise ValueError(f"quantization must be a kvpress.KVQuant or None, got {type(quantization).__name__}")
        if after_prompt not in AFTER_PROMPT_MODES:
            raise ValueError(f"after_prompt must be one of {AFTER_PROMPT_MODES}, got {after_prompt!r}")
        if after_prompt == "append" and policy is not None and policy.runs_decoder_layers:
            raise ValueError(f"after_prompt='append' compresses the prompt's cache once; {type(policy).__name__} prunes "
                             "the computation of the decoder layers and evicts nothing, so it takes 'evict' only")
        super().__init__(layers=[])
        self.policy = policy
        self.after_prompt = after_prompt
        self.chain = policy.chain() if policy is not None else []  # outermost first
        self.slack = slack
        self.quantization = quantization
        self.types_known = False
        self._start()
        if config is not None:
            self._build_layers(config)

    def _start(self) -> None:
        self._last_layer = -1
        self._mask_sizes_asked = False
        self.mask_from_sizes = False  # this forward's mask was built by transformers from get_mask_sizes
        self.shared = CrossLayerState()  # the policies' cross-layer state, handed to every layer's context
        for layer in self.pruned_layers():
            layer.rebind(replace(layer.context, shared=self.shared), layer.sliding_window)

    def _context(self, pruned_index: int = 0, pruned_count: int = 1) -> LayerContext:
        return LayerContext(policy=self.policy, chain=tuple(self.chain), slack=self.slack,
                            quantization=self.quantization, pruned_index=pruned_index,
                            pruned_count=pruned_count, shared=self.shared,
                            follows_budget=self.policy is None or follows_the_budget(self.policy),
                            after_prompt=self.after_prompt)

    def _build_layers(self, config) -> None:
        layer_types, per_layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        # a policy that lays out the tokens of a layer itself (LazyLLM) needs every layer to be one of ours
        every_layer_slides = all(kind in SLIDING_TYPES for kind in layer_types) or (
            self.policy is not None and self.policy.runs_decoder_layers)
        pruned = [kind == "full_attention" or (kind in SLIDING_TYPES and every_layer_slides) for kind in layer_types]
        layers = []
        for index, (kind, kwargs) in enumerate(zip(layer_types, per_layer_kwargs)):
            if pruned[index]:
                context = self._context(sum(pruned[:index]), sum(pruned))
                window = kwargs["sliding_window"] if kind in SLIDING_TYPES else None
                layers.append(PrunedLayer(context, index, sliding_window=window))
            elif kind in DYNAMIC_LAYER_TYPE_MAPPING:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs))
            else:
                raise NotImplementedError(f"layer type {kind!r} (layer {index}) is not supported by PrunedCache")
        self.layers = layers
        self.types_known = True

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx <= self._last_layer:
            self.shared.forward_index += 1
        if layer_idx <= self._last_layer or self._last_layer < 0:  # a forward begins
            self.mask_from_sizes, self._mask_sizes_asked = self._mask_sizes_asked, False
        self._last_layer = layer_idx
        if key_states.shape[-2] == 1 and (self.shared.allocation_pending or not self.shared.prompt_done):
            self.end_prefill()  # a one-token forward ends the prompt (a later turn's too)
        layer = self.layer_at(layer_idx)
        keys, values = layer.update(key_states, value_states, *args, **kwargs)
        if isinstance(layer, PrunedLayer):
            hook.leave_handoff(hook.Handoff(self, self.shared.forward_index, layer, keys))
        return keys, values

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        # transformers asks for the sizes only when it builds the mask itself: a 4-D mask that reaches the
        # attention without this call is the caller's own (masking_utils returns those as they are)
        self._mask_sizes_asked = True
        if query_length == 0:  # transformers' own error comes later, from a reshape in the attention projection
            raise ValueError("input_ids: a forward over a PrunedCache needs at least one new token, got 0 "
                             "(an empty prompt); pass input_ids of shape [batch, tokens] with tokens >= 1.")
        return super().get_mask_sizes(query_length, layer_idx)

    def attend(self, layer: PrunedLayer, original, module, query, key, value, attention_mask, *args, **kwargs):
        """One forward's attention of `layer` (called by the attention hook). At the first forward without
        `config=`, the layer types are learned from the model first; a layer that turns out to be one of
        transformers' own sliding layers runs the model's attention and is never pruned."""
        if not self.types_known:
            holder = self.adopt_model_config(module.config, layer)
            if holder is not layer:
                return original(module, query, key, value, attention_mask, *args, **kwargs)
        custom_mask = (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
                       and not self.mask_from_sizes)
        return layer.attend(original, module, query, key, value, attention_mask, *args, custom_mask=custom_mask,
                            **kwargs)

    def layer_at(self, layer_idx: int):
        """Layer `layer_idx`, created (as a `PrunedLayer`) with the ones before it if the cache has not
        reached it yet."""
        while len(self.layers) <= layer_idx:
            self.layers.append(PrunedLayer(self._context(), len(self.layers)))
        return self.layers[layer_idx]

    @property
    def prefill_owner(self) -> EvictionPolicy | None:
        """The policy of the chain that owns its prefill (`owns_prefill`: KVzip), None for the others."""
        return next((member for member in self.chain if member.owns_prefill), None)

    def prefill(self, model, input_ids: torch.Tensor, *, tokenizer=None, attention_mask=None,
                logits_to_keep: int = 0, **options) -> torch.Tensor:
        """Prefill the prompt `input_ids [B, T]` and compress it now; returns its logits `[B, T, V]` (the
        last `logits_to_keep` positions' when given: 1 when only the next token is needed skips the LM
        head over the prompt). A policy that owns its prefill (KVzip) runs its own (the tokenizer
        builds KVzip's repeat request; `options` go to it); any other gets one forward, then
        `end_prefill()`, and refuses `options`. To continue with `generate`, prefill all but the last
        prompt token, then pass the full ids."""
        if input_ids.dim() != 2 or input_ids.shape[-1] == 0:
            raise ValueError(f"prefill: input_ids must be [batch, tokens] with at least one token, got shape "
                             f"{tuple(input_ids.shape)}")
        check_int("prefill", "logits_to_keep", logits_to_keep, 0)
        owner = self.prefill_owner
        if owner is None:
            if options:
                raise ValueError(f"prefill: {', '.join(sorted(options))} apply to a policy that owns its prefill "
                                 f"(KVzip); {type(self.policy).__name__ if self.policy else 'no policy'} takes none")
            with torch.no_grad():
                logits = model(input_ids, attention_mask=attention_mask, cache=self, use_cache=True,
                               logits_to_keep=logits_to_keep).logits
            self.end_prefill()
            return logits
        self.shared.owner_prefill = True
        try:
            logits = owner.prefill(model, input_ids, self, tokenizer=tokenizer, attention_mask=attention_mask,
                                   logits_to_keep=logits_to_keep, **options)
        finally:
            self.shared.owner_prefill = False
        self.shared.prompt_done = True
        return logits

    @property
    def prefill_pending(self) -> bool:
        """Whether a cross-layer allocation waits for the end of the prompt."""
        return self.shared.allocation_pending

    def end_prefill(self) -> None:
        """End the prompt: run a pending cross-layer allocation now, and from here a cache built with
        `after_prompt="append"` evicts nothing. The cache calls it at the first decoding step; call it
        yourself after a prefill-only forward to compact at once (before scoring a reference answer
        with a teacher-forced multi-token forward, say, which would otherwise count as more prompt)."""
        self.shared.prompt_done = True
        if self.shared.allocation_pending:
            self.shared.allocation_pending = False
            allocate_across_layers(self.policy, self.pruned_layers())

    def adopt_model_config(self, config, layer: PrunedLayer):
        """At the first forward without `config=`: build the layer types from the model's config.
        Returns the layer that now holds `layer`'s tokens (a sliding layer if layer 0 is sliding)."""
        existing = list(self.layers)
        self._build_layers(config)
        for index, old in enumerate(existing):
            new = self.layers[index]
            if isinstance(new, PrunedLayer):
                old.rebind(new.context, new.sliding_window)
                self.layers[index] = old
            elif old.is_initialized:
                new.update(old.keys, old.values)
        return self.layers[layer.layer_idx]

    def pruned_layers(self) -> list[PrunedLayer]:
        return [layer for layer in self.layers if isinstance(layer, PrunedLayer)]

    def depth_of(self, policy: EvictionPolicy) -> int:
        """Position of `policy` (one of this cache's chain) in the chain, by identity."""
        return depth_in(self.chain, policy)

    def shared_state(self, policy: EvictionPolicy, create=None):
        """The cross-layer state of `policy` (one of this cache's chain): None before its first use,
        unless `create` (no arguments) makes it then."""
        depth = self.depth_of(policy)
        if depth not in self.shared.states and create is not None:
            self.shared.states[depth] = create()
        return self.shared.states.get(depth)

    # ---- state the cache owns beyond its layers ----
    def _map_shared(self, fn) -> None:
        self.shared.map_tensors(fn)

    def reset(self) -> None:
        super().reset()
        self._start()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_shared(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_shared(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_shared(lambda t: t[indices, ...])

    def to(self, device) -> PrunedCache:
        """Move every tensor the cache holds (slots, policy state, and the keys and values of the layers
        left to transformers: the sliding layers of a hybrid model) to `device`."""
        for layer in self.layers:
            if isinstance(layer, PrunedLayer):
                layer.map_tensors(lambda t: t.to(device))
            else:  # transformers' own layer: its tensors are plain attributes
                for name, value in vars(layer).items():
                    if isinstance(value, torch.Tensor):
                        setattr(layer, name, value.to(device))
                if getattr(layer, "device", None) is not None:
                    layer.device = torch.device(device)
        self._map_shared(lambda t: t.to(device))
        return self

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        """Never, layers or not: evicted tokens cannot be restored, so callers that roll the cache back
        (assisted and speculative decoding) are refused up front."""
        return False

    def report(self) -> CacheReport:
        """Per-layer tokens seen, slots kept, bytes held and evictions; the bytes of policy state kept across
        layers (LazyLLM's auxiliary cache, SpAtten's cascade); totals and kept/seen ratio. A policy
        of the chain that evicts whole blocks (`block_wise`, PagedEviction) adds the
        block size of each pruned layer, so the report also counts the blocks held."""
        rows = [_layer_report(i, layer) for i, layer in enumerate(self.layers)]
        paged = next((member for member in self.chain if member.block_wise), None)
        if paged is not None:
            rows = [replace(row, block_size=paged.block_size_of(layer))
                    if isinstance(layer, PrunedLayer) and layer.is_initialized else row
                    for row, layer in zip(rows, self.layers)]
        return CacheReport(rows, shared_bytes=self.shared.nbytes, after_prompt=self.after_prompt,
                           prompt_done=self.shared.prompt_done, allocation_pending=self.shared.allocation_pending)
