"""`CacheReport`: what a `PrunedCache` holds, per layer and in total."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerReport:
    """One layer: `seen` tokens given (logical length, padding included), `kept` slots held per KV head,
    `bytes` allocated for keys, values and slot metadata, `evictions` compactions run, `pruned` whether
    the policy manages this layer (sliding-window layers are left to transformers)."""

    layer: int
    seen: int
    kept: int
    bytes: int
    evictions: int
    pruned: bool = True


@dataclass(frozen=True)
class CacheReport:
    """Per-layer rows plus totals: `total_bytes` and `ratio` (slots kept / tokens seen)."""

    layers: list[LayerReport] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(row.bytes for row in self.layers)

    @property
    def ratio(self) -> float:
        seen = sum(row.seen for row in self.layers)
        return sum(row.kept for row in self.layers) / seen if seen else 1.0

    @property
    def mean_kept(self) -> float:
        return sum(row.kept for row in self.layers) / len(self.layers) if self.layers else 0.0

    def __str__(self) -> str:
        lines = [f"{'layer':>5} {'seen':>8} {'kept':>8} {'bytes':>12} {'evictions':>9}"]
        for row in self.layers:
            tag = "" if row.pruned else "  (not pruned)"
            lines.append(f"{row.layer:>5} {row.seen:>8} {row.kept:>8} {row.bytes:>12,} {row.evictions:>9}{tag}")
        lines.append(f"total bytes {self.total_bytes:,}; kept/seen {self.ratio:.3f}")
        return "\n".join(lines)
