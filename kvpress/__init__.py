"""kvpress: KV-cache eviction for transformers' `generate`.

    from kvpress import PrunedCache
    from kvpress.policies import H2O
    out = model.generate(ids, cache=PrunedCache(H2O(budget=256)), max_new_tokens=128)

Importing the package installs the attention hook (`kvpress.attention.install`); models that use an
ordinary cache are unaffected.
"""

from kvpress import attention as _attention
from kvpress.cache import PrunedCache, PrunedLayer
from kvpress.models import load_model
from kvpress.policy import AttentionRequest, EvictionPolicy, Policy, Selection, Wrapper
from kvpress.quant import KVQuant
from kvpress.report import CacheReport, LayerReport

_attention.install()

__all__ = [
    "AttentionRequest",
    "CacheReport",
    "EvictionPolicy",
    "KVQuant",
    "LayerReport",
    "Policy",
    "PrunedCache",
    "PrunedLayer",
    "Selection",
    "Wrapper",
    "load_model",
]
