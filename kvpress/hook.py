"""The attention hook, a wrapper around whatever attention function transformers resolves, and the
decoder-layer hook, through which a policy that changes what the model computes (LazyLLM) runs
each decoder layer.

`AttentionInterface.get_interface` is patched once (idempotent, reversible) so that every attention
function a model resolves, the model's own eager function included, is wrapped. The wrapper is a
pass-through unless the cache layer updated just before, in the same thread, is a `PrunedLayer` and
the key tensor it returned is the one being attended: `PrunedLayer.update` leaves a thread-local
handoff that the wrapper consumes.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch
from transformers.modeling_layers import GradientCheckpointingLayer
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
    """Called by `PrunedLayer.update`. An unconsumed handoff from the same cache and forward means the
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
        return handoff.layer.attend(original, module, query, key, value, attention_mask, *args, **kwargs)

    pruned_attention.__kvpress_wrapper__ = True
    _wrappers[original] = pruned_attention
    return pruned_attention


_wrappers: dict = {}
_original_get_interface = None
_original_layer_call = None


def _decoder_layer_call(module, *args, **kwargs):
    """Every decoder layer of transformers' models (`GradientCheckpointingLayer`) is called through here:
    a cache whose policy runs decoder layers itself (`runs_decoder_layers`) gets the call, anything
    else goes to the module as usual. Decoder layers receive the cache as the `cache` keyword."""
    cache = kwargs.get("cache")
    policy = getattr(cache, "policy", None)
    if policy is not None and policy.runs_decoder_layers:
        return policy.run_decoder_layer(cache, module, _original_layer_call, args, kwargs)
    return _original_layer_call(module, *args, **kwargs)


def install() -> None:
    """Wrap every attention function transformers resolves from now on, and route decoder-layer calls
    through `_decoder_layer_call`. Idempotent."""
    global _original_get_interface, _original_layer_call
    if _original_get_interface is not None:
        return
    _original_get_interface = AttentionInterface.get_interface

    def get_interface(self, attn_implementation, default):
        return _wrap(_original_get_interface(self, attn_implementation, default))

    get_interface.__wrapped__ = _original_get_interface
    AttentionInterface.get_interface = get_interface
    _original_layer_call = GradientCheckpointingLayer.__call__
    GradientCheckpointingLayer.__call__ = _decoder_layer_call


def uninstall() -> None:
    """Restore transformers' own `get_interface` and decoder-layer call."""
    global _original_get_interface, _original_layer_call
    if _original_get_interface is None:
        return
    AttentionInterface.get_interface = _original_get_interface
    if _original_layer_call is torch.nn.Module.__call__:
        del GradientCheckpointingLayer.__call__  # inherited again
    else:
        GradientCheckpointingLayer.__call__ = _original_layer_call
    _original_get_interface = _original_layer_call = None
