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

from kvpress.eviction import allocate_across_layers
from kvpress.layer import PrunedLayer
from kvpress.policy import EvictionPolicy
from kvpress.quant_config import KVQuant
from kvpress.report import CacheReport, LayerReport
from kvpress.state import State

SLIDING_TYPES = ("sliding_attention", "chunked_attention")


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
    config: the model config, to know up front which layers are sliding-window layers. In a hybrid
        model (full and sliding layers) the sliding ones keep transformers' own layer and are never
        pruned; in a model whose every layer slides (Mistral, Phi-3, Qwen2 with `use_sliding_window`),
        every layer is pruned and also drops tokens older than the window. Without `config` the types
        are read from the model at its first forward.
    slack: slots a layer may exceed its budget by before it compacts; compaction then goes back to
        the budget. 0 evicts at every step (H2O's definition); a larger slack amortises the copy.
    quantization: `KVQuant(bits, group_size, residual)` to store kept slots quantized (KIVI-style,
        kvpress/quant.py); attention and policies read the dequantized slots. Without it, the policy
        chain chooses the storage (`QuantizedPruning`, wherever it stands in the chain).
    """

    def __init__(self, policy: EvictionPolicy | None = None, *, config=None, slack: int = 0,
                 quantization: KVQuant | None = None):
        if policy is not None and not isinstance(policy, EvictionPolicy):
            raise ValueError(f"policy must be a kvpress policy or None, got {type(policy).__name__}")
        if isinstance(slack, bool) or not isinstance(slack, int) or slack < 0:
            raise ValueError(f"slack must be an int >= 0, got {slack!r}")
        if quantization is not None and not isinstance(quantization, KVQuant):
            raise ValueError(f"quantization must be a kvpress.KVQuant or None, got {type(quantization).__name__}")
        super().__init__(layers=[])
        self.policy = policy
        self.chain = policy.chain() if policy is not None else []  # outermost first
        self.slack = slack
        self.quantization = quantization
        self.types_known = False
        self._start()
        if config is not None:
            self._build_layers(config)

    def _start(self) -> None:
        self.forward_index = 0
        self._last_layer = -1
        self.shared: dict[int, State] = {}  # depth of a policy in the chain -> its cross-layer state
        self.prefill_pending = False  # a cross-layer allocation waits for the end of the prompt

    def _build_layers(self, config) -> None:
        layer_types, per_layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        # a policy that lays out the tokens of a layer itself (LazyLLM) needs every layer to be one of ours
        every_layer_slides = all(kind in SLIDING_TYPES for kind in layer_types) or getattr(
            self.policy, "runs_decoder_layers", False)
        layers = []
        for index, (kind, kwargs) in enumerate(zip(layer_types, per_layer_kwargs)):
            if kind == "full_attention":
                layers.append(PrunedLayer(self, index))
            elif kind in SLIDING_TYPES and every_layer_slides:
                layers.append(PrunedLayer(self, index, sliding_window=kwargs["sliding_window"]))
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
        if self.prefill_pending and key_states.shape[-2] == 1:
            self.end_prefill()
        return self.layer_at(layer_idx).update(key_states, value_states, *args, **kwargs)

    def layer_at(self, layer_idx: int):
        """Layer `layer_idx`, created (as a `PrunedLayer`) with the ones before it if the cache has not
        reached it yet."""
        while len(self.layers) <= layer_idx:
            self.layers.append(PrunedLayer(self, len(self.layers)))
        return self.layers[layer_idx]

    def end_prefill(self) -> None:
        """Run a pending cross-layer allocation now. The cache calls it at the first decoding step;
        call it yourself after a prefill-only forward to compact at once."""
        if self.prefill_pending:
            allocate_across_layers(self)

    def adopt_model_config(self, config, layer: PrunedLayer):
        """At the first forward without `config=`: build the layer types from the model's config.
        Returns the layer that now holds `layer`'s tokens (a sliding layer if layer 0 is sliding)."""
        existing = list(self.layers)
        self._build_layers(config)
        for index, old in enumerate(existing):
            new = self.layers[index]
            if isinstance(new, PrunedLayer):
                old.sliding_window = new.sliding_window
                self.layers[index] = old
            elif old.is_initialized:
                new.update(old.keys, old.values)
        return self.layers[layer.layer_idx]

    def pruned_layers(self) -> list[PrunedLayer]:
        return [layer for layer in self.layers if isinstance(layer, PrunedLayer)]

    def shared_state(self, policy: EvictionPolicy, layer: PrunedLayer) -> State:
        """The cross-layer state of `policy`, created through it at its first use."""
        key = self.depth_of(policy)
        if key not in self.shared:
            self.shared[key] = policy.new_shared_state(layer)
        return self.shared[key]

    def depth_of(self, policy: EvictionPolicy) -> int:
        """Position of `policy` in this cache's chain. Policies are found by identity, not equality (two
        equal policies may stand in one chain), and the position, unlike `id`, survives `copy.deepcopy`."""
        for depth, member in enumerate(self.chain):
            if member is policy:
                return depth
        raise ValueError(f"{type(policy).__name__} is not part of this cache's policy chain")

    def storage_for(self, layer: PrunedLayer) -> KVQuant | None:
        """The storage of `layer`: the cache's `quantization`, else the policy chain's choice."""
        if self.quantization is not None:
            return self.quantization
        return self.policy.storage(layer) if self.policy is not None else None

    # ---- state the cache owns beyond its layers ----
    def _map_shared(self, fn) -> None:
        for state in self.shared.values():
            state.map_tensors(fn)

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
        """Move every tensor the cache holds (slots, policy state) to `device`."""
        for layer in self.layers:
            if isinstance(layer, PrunedLayer):
                layer.map_tensors(lambda t: t.to(device))
        self._map_shared(lambda t: t.to(device))
        return self

    @property
    def is_compileable(self) -> bool:
        return False

    def report(self) -> CacheReport:
        """Per-layer tokens seen, slots kept, bytes held and evictions; the bytes of policy state kept across
        layers (LazyLLM's auxiliary cache, SpAtten's cascade); totals and kept/seen ratio. A policy
        of the chain that evicts whole blocks (one with `block_size_of(layer)`, PagedEviction) adds the
        block size of each pruned layer, so the report also counts the blocks held."""
        rows = [_layer_report(i, layer) for i, layer in enumerate(self.layers)]
        paged = next((member for member in self.chain if hasattr(member, "block_size_of")), None)
        if paged is not None:
            rows = [replace(row, block_size=paged.block_size_of(layer))
                    if isinstance(layer, PrunedLayer) and layer.is_initialized else row
                    for row, layer in zip(rows, self.layers)]
        return CacheReport(rows, shared_bytes=sum(state.nbytes for state in self.shared.values()))
