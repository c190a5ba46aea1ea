"""kvpress: KV-cache eviction for transformers' `generate`.

    from kvpress import PrunedCache
    from kvpress.policies import H2O
    out = model.generate(ids, cache=PrunedCache(H2O(budget=256)), max_new_tokens=128)

Importing the package installs the attention hook (`kvpress.hook.install`); models that use an
ordinary cache are unaffected.
"""

from kvpress import hook as _hook
from kvpress.cache import PrunedCache
from kvpress.cache_report import CacheReport, LayerReport
from kvpress.composition import CompositionError
from kvpress.layer import PrunedLayer
from kvpress.models import load_model
from kvpress.policy import EvictionPolicy, Policy, Wrapper
from kvpress.quant_config import KVQuant
from kvpress.selection import Selection
from kvpress.signals import AttentionRequest, Signals

_hook.install()

__all__ = [
    "AttentionRequest",
    "CacheReport",
    "CompositionError",
    "EvictionPolicy",
    "KVQuant",
    "LayerReport",
    "Policy",
    "PrunedCache",
    "PrunedLayer",
    "Selection",
    "Signals",
    "Wrapper",
    "load_model",
]
