"""`CacheReport`: what a `PrunedCache` holds, per layer and in total."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerReport:
    """One layer: `seen` tokens given (logical length, padding included), `kept` slots held per KV head,
    `capacity` slots allocated per KV head (kept slots, holes and the free headroom of in-place writes:
    at most 1/20 of the slots in use plus the cache's slack, kvpress/sizing.py; per-head storage counts
    its widest head), `bytes` allocated for keys, values and slot metadata, `evictions` compactions run,
    `pruned` whether
    the policy manages this layer (sliding-window layers are left to transformers), `block_size` the
    slots per block of a block-wise policy (PagedEviction; None otherwise), so `blocks` is the number
    of pages a paged engine would hold for it. `dynamic_bytes`: the key and value bytes transformers'
    `DynamicCache` holds for the same tokens (computed from `seen` and the layer's shape: batch x KV
    heads x tokens held x head_dim x 2 x bytes per element, tokens held being `seen`, or the last
    `window - 1` of a sliding-window layer), the reference memory savings are measured against."""

    layer: int
    seen: int
    kept: int
    bytes: int
    evictions: int
    pruned: bool = True
    block_size: int | None = None
    capacity: int | None = None
    dynamic_bytes: int = 0

    @property
    def blocks(self) -> int | None:
        """Blocks held per KV head (the newest one may be partly filled); None without blocks."""
        return None if self.block_size is None else -(-self.kept // self.block_size)


@dataclass(frozen=True)
class CacheReport:
    """Per-layer rows plus totals: `total_bytes` (layers and `shared_bytes`) and `ratio` (slots kept /
    tokens seen); the cache's `after_prompt` mode, whether the prompt has ended and whether a cross-layer
    allocation still waits for its end."""

    layers: list[LayerReport] = field(default_factory=list)
    shared_bytes: int = 0  # policy state kept across layers (LazyLLM's hidden states, SpAtten's cascade)
    after_prompt: str = "evict"  # the cache's mode: "evict" evicts while decoding, "append" compressed once
    prompt_done: bool = False  # the prompt has ended (first one-token forward, end_prefill() or prefill())
    allocation_pending: bool = False  # a cross-layer allocation waits for the end of the prompt

    @property
    def total_bytes(self) -> int:
        return sum(row.bytes for row in self.layers) + self.shared_bytes

    @property
    def dynamic_bytes(self) -> int:
        """Key and value bytes transformers' `DynamicCache` holds for the same tokens (every layer)."""
        return sum(row.dynamic_bytes for row in self.layers)

    @property
    def vs_dynamic(self) -> float | None:
        """`total_bytes / dynamic_bytes`: the memory held relative to `DynamicCache` for the same tokens."""
        return self.total_bytes / self.dynamic_bytes if self.dynamic_bytes else None

    @property
    def ratio(self) -> float:
        seen = sum(row.seen for row in self.layers)
        return sum(row.kept for row in self.layers) / seen if seen else 1.0

    @property
    def mean_kept(self) -> float:
        return sum(row.kept for row in self.layers) / len(self.layers) if self.layers else 0.0

    def __str__(self) -> str:
        paged = any(row.block_size is not None for row in self.layers)
        lines = [f"{'layer':>5} {'seen':>8} {'kept':>8} {'capacity':>8} {'bytes':>12} {'evictions':>9}"
                 + (f" {'blocks':>6} {'block':>5}" if paged else "")]
        for row in self.layers:
            tag = "" if row.pruned else "  (not pruned)"
            blocks = ""
            if paged:
                blocks = f" {row.blocks:>6} {row.block_size:>5}" if row.block_size is not None else f" {'-':>6} {'-':>5}"
            capacity = "-" if row.capacity is None else row.capacity
            lines.append(f"{row.layer:>5} {row.seen:>8} {row.kept:>8} {capacity:>8} {row.bytes:>12,} "
                         f"{row.evictions:>9}{blocks}{tag}")
        if self.shared_bytes:
            lines.append(f"policy state across layers {self.shared_bytes:,} bytes")
        if self.after_prompt == "append":
            lines.append("after_prompt: append (the prompt is compressed once; later tokens are appended)"
                         + ("" if self.prompt_done else "; the prompt has not ended yet"))
        if self.allocation_pending:
            lines.append("cross-layer allocation pending: the prompt is compressed at the first decoding step "
                         "or at cache.end_prefill()")
        versus = f"; {self.vs_dynamic:.3f}x DynamicCache's {self.dynamic_bytes:,}" if self.dynamic_bytes else ""
        lines.append(f"total bytes {self.total_bytes:,}{versus}; kept/seen {self.ratio:.3f}")
        return "\n".join(lines)
