"""Quantized pruning: under a fixed memory, more tokens at lower precision."""

from __future__ import annotations

from dataclasses import dataclass

from kvpress.budgets import check_bool
from kvpress.memory import parse_memory, slots_for_memory
from kvpress.policy import Wrapper
from kvpress.quant_config import KVQuant, check_bits


@dataclass
class QuantizedPruning(Wrapper):
    """Prune with `inner` (its scores, sinks and window) to as many slots as `memory` bytes hold at
    `bits` bits, and store the kept slots KIVI-quantized (kvpress/quantized.py): at b bits a slot costs
    about `b / 16` (fp16/bf16 models) or `b / 32` (fp32 models) of a full-precision slot, so the cache
    keeps about `16 / b` (`32 / b`) times more tokens than eviction alone at the same memory.

    Zhang et al., "More Tokens, Lower Precision: Towards the Optimal Token-Precision Trade-off in KV
    Cache Compression", arXiv 2412.12706. Slots per KV head per layer
    `k = max{k : bytes(k) <= memory / (layers * kv_heads)}` (`memory / kv_heads` with `per_layer`),
    where `bytes(k)` counts packed codes, scales and zero points (in the model dtype), key-block counts
    and the full-precision residual exactly (`KVQuant.bytes_for_slots`). The chain's `budget` is
    replaced by `k` (`budget_of`), so the inner policy's own per-layer and per-head counts (PyramidKV,
    AdaKV) are computed around `k`, in either order of composition; memory is per sequence (batch row).

    bits: 2, 4 or 8; None applies the paper's rule: the highest precision (full, then 8, then 4 bits)
    at which the memory holds every token seen at the first eviction, and 4 bits when even 4 bits
    cannot hold them all (the paper: 8 bits is lossless, 4 bits costs at most about a point at a
    fixed token count, 2 bits collapses, and at equal memory 4x the tokens at 4 bits beats full
    precision). A layer stays in full precision while its memory holds every token; the precision
    chosen when it first quantizes (at prefill for a long prompt) is kept.
    group_size, residual: the KIVI groups and full-precision recent slots (`KVQuant`); the paper's
    runs keep generated tokens in full precision; here `residual=0` keeps only the last partial
    group in full precision so that the memory goes to prompt tokens.
    """

    spec_name = "quantizedpruning"
    sets_storage = True

    memory: int | str = "64MiB"
    bits: int | None = None
    group_size: int = 32
    residual: int = 0
    per_layer: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.memory_bytes = parse_memory(self.memory)
        if self.bits is not None:
            check_bits("QuantizedPruning", self.bits)
        KVQuant(4, self.group_size, self.residual)  # validates group_size and residual
        check_bool("QuantizedPruning", "per_layer", self.per_layer)

    # ---- the plan: precision and slots for a layer ----
    def layer_memory(self, layer) -> int:
        """Bytes per KV head of one layer (per sequence)."""
        layers = 1 if self.per_layer else layer.context.pruned_count
        return self.memory_bytes // (max(layers, 1) * layer.num_heads)

    exact_storage = True  # `memory` is a hard limit: no storage headroom beyond the slots kept

    def storage(self, layer) -> KVQuant | None:
        """Storage the cache uses for `layer` (None: full precision, chosen by the rule), wherever this
        policy stands in the chain."""
        if self.bits is not None:
            return KVQuant(self.bits, self.group_size, self.residual)
        store = getattr(layer, "store", None)
        return store.quant if store is not None else self.choose_bits(layer)

    def choose_bits(self, layer) -> KVQuant | None:
        """The paper's rule (class docstring) for the tokens `layer` has seen (its host-side count: an upper
        bound of every row's real tokens in a left-padded batch, read without a sync)."""
        memory, dim, itemsize = self.layer_memory(layer), layer.head_dim, layer.itemsize
        tokens = layer.seen
        for bits in (None, 8, 4):
            quant = None if bits is None else KVQuant(bits, self.group_size, self.residual)
            if slots_for_memory(memory, dim, itemsize, quant) >= tokens:
                return quant
        return KVQuant(4, self.group_size, self.residual)

    def slots(self, layer) -> int:
        """Slots per KV head for `layer` at the precision its cache stores (a cache's own `quantization`
        overrides this policy's bits)."""
        quant = layer.context.storage_for(layer)
        dim, itemsize = layer.head_dim, layer.itemsize
        if quant is not None:
            quant.check_head_dim(dim)
        slots = slots_for_memory(self.layer_memory(layer), dim, itemsize, quant)
        protected = self.sinks + self.window
        if slots <= protected:
            precision = f"{quant.bits} bits" if quant else "full precision"
            raise ValueError(
                f"QuantizedPruning: memory={self.memory!r} holds {slots} slots per KV head per layer at {precision} "
                f"(head_dim {dim}, {itemsize}-byte dtype, {layer.num_heads} KV heads), not more than the inner "
                f"policy's sinks + window ({self.sinks} + {self.window}); give more memory or fewer protected slots")
        return slots

    def budget_of(self, layer) -> int:
        """The chain's budget becomes the slots the memory holds at the chosen precision, so the inner
        policy's per-layer (PyramidKV) and per-head (AdaKV) counts scale with the precision gain."""
        return self.slots(layer)
