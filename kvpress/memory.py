"""Memory in bytes: budgets given as strings (`parse_memory`), the slots they hold
(`slots_for_memory`), and the key/value bytes a cache has allocated (`kv_bytes`)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from kvpress.quant_config import KVQuant

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(memory) -> int:
    """Bytes from an int or a string such as `"64MiB"`, `"1.5GB"`, `"512 KB"`, `"4096"` (B, KB/MB/GB/TB
    are powers of 1000, KiB/MiB/GiB/TiB powers of 1024)."""
    if isinstance(memory, bool):
        raise ValueError(f"memory must be an int number of bytes or a string like '64MiB' or '1.5GB', got {memory!r}")
    if isinstance(memory, int):
        value = memory
    elif isinstance(memory, float) and memory.is_integer():
        value = int(memory)
    elif isinstance(memory, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", memory)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"memory {memory!r} is not understood: use an int number of bytes or a number with "
                             f"a unit among B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. '64MiB', '1.5GB')")
        value = int(float(match.group(1)) * _UNITS[unit])
    else:
        raise ValueError(f"memory must be an int number of bytes or a string like '64MiB' or '1.5GB', got {memory!r}")
    if value <= 0:
        raise ValueError(f"memory must be > 0 bytes, got {memory!r}")
    return value


def slots_for_memory(memory: int, head_dim: int, itemsize: int, quant: KVQuant | None) -> int:
    """Most slots per KV head whose keys and values fit in `memory` bytes: full precision
    (`2 * head_dim * itemsize` per slot) when `quant` is None, else `quant.bytes_for_slots` exactly."""
    if quant is None:
        return memory // (2 * head_dim * itemsize)
    low, high = 0, memory * 8 // (2 * head_dim * quant.bits) + 1  # high: no slot costs less than its codes
    while low < high:
        mid = (low + high + 1) // 2
        if quant.bytes_for_slots(mid, head_dim, itemsize) <= memory:
            low = mid
        else:
            high = mid - 1
    return low


def kv_bytes(cache) -> int:
    """Bytes of keys and values a cache has allocated (codes, scales, zero points, block counts and
    full-precision residual for quantized layers; key and value storage, capacity included,
    otherwise), without the eviction bookkeeping (`valid`, `positions`, `scores`). Works for
    `PrunedCache` and transformers caches."""
    total = 0
    for layer in getattr(cache, "layers", []):
        slots = getattr(layer, "slots", None)
        if slots is not None:  # a PrunedLayer: its buffers (or quantized store), not only the slots in use
            total += slots.kv_nbytes
            continue
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += _tensor_bytes(getattr(layer, name, None))
    return total


def _tensor_bytes(obj) -> int:
    """Bytes of a tensor, a quanto QTensor (its inner tensors) or an HQQ `(packed, meta)` pair."""
    if obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            return 0
        inner = getattr(obj, "__tensor_flatten__", None)
        if inner is not None and type(obj) is not torch.Tensor:
            names, _ = inner()
            return sum(_tensor_bytes(getattr(obj, n)) for n in names)
        return obj.nbytes
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o) for o in obj.values())
    return 0
