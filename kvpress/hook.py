"""The attention hook: a wrapper around whatever attention function transformers resolves.

`AttentionInterface.get_interface` is patched once (idempotent, reversible) so that every attention
function a model resolves, the model's own eager function included, is wrapped. The wrapper is a
pass-through unless the cache layer updated just before, in the same thread, is a `PrunedLayer` and
the key tensor it returned is the one being attended: `PrunedCache.update` leaves a thread-local
handoff that the wrapper consumes, and hands the call to `PrunedCache.attend`.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch
from transformers.modeling_utils import AttentionInterface

SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "falcon (RoPE)")


class Handoff:
    """What `PrunedLayer.update` leaves for the attention call that follows: the layer, the forward it
    belongs to and the key tensor it returned. Only weak references: a forward that raises between
    `update` and attention leaves nothing alive in the thread-local."""

    __slots__ = ("_cache", "_key", "_layer", "forward")

    def __init__(self, cache, forward: int, layer, key: torch.Tensor):
        self._cache, self._layer, self._key = weakref.ref(cache), weakref.ref(layer), weakref.ref(key)
        self.forward = forward

    @property
    def cache(self):
        return self._cache()

    @property
    def layer(self):
        return self._layer()

    @property
    def key(self) -> torch.Tensor | None:
        return self._key()


_local = threading.local()


def take_handoff(key: torch.Tensor) -> Handoff | None:
    handoff = getattr(_local, "handoff", None)
    if handoff is None or handoff.key is not key:
        return None
    _local.handoff = None
    return handoff if handoff.layer is not None else None


def leave_handoff(handoff: Handoff) -> None:
    """Called by `PrunedCache.update`. An unconsumed handoff from the same cache and forward means the
    previous layer's attention never went through the interface (a model that calls SDPA itself)."""
    stale = getattr(_local, "handoff", None)
    if stale is not None and stale.cache is not None and stale.cache is handoff.cache \
            and stale.forward == handoff.forward:
        _local.handoff = None
        raise NotImplementedError(
            "This model computes attention without transformers' AttentionInterface, so PrunedCache cannot "
            f"see or prune it (layer {getattr(stale.layer, 'layer_idx', '?')}). Supported model families: "
            f"{', '.join(SUPPORTED_FAMILIES)}, and others that resolve attention through the interface."
        )
    _local.handoff = handoff


def _wrap(original):
    cached = _wrappers.get(original)
    if cached is not None:
        return cached

    @functools.wraps(original)
    def pruned_attention(module, query, key, value, attention_mask, *args, **kwargs):
        handoff = take_handoff(key)
        if handoff is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        return handoff.cache.attend(handoff.layer, original, module, query, key, value, attention_mask, *args,
                                    **kwargs)

    pruned_attention.__kvpress_wrapper__ = True
    _wrappers[original] = pruned_attention
    return pruned_attention


_wrappers: dict = {}
_original_get_interface = None


def install() -> None:
    """Wrap every attention function transformers resolves from now on. Idempotent."""
    global _original_get_interface
    if _original_get_interface is not None:
        return
    _original_get_interface = AttentionInterface.get_interface

    def get_interface(self, attn_implementation, default):
        return _wrap(_original_get_interface(self, attn_implementation, default))

    get_interface.__wrapped__ = _original_get_interface
    AttentionInterface.get_interface = get_interface


def uninstall() -> None:
    """Restore transformers' own `get_interface`."""
    global _original_get_interface
    if _original_get_interface is None:
        return
    AttentionInterface.get_interface = _original_get_interface
    _original_get_interface = None
