"""Eviction policies, one module each. `REGISTRY` maps lowercase names to classes (spec strings,
`kvpress policies`)."""

from kvpress.policies.h2o import H2O
from kvpress.policies.knorm import Knorm
from kvpress.policies.random_policy import RandomPolicy
from kvpress.policies.snapkv import SnapKV
from kvpress.policies.streaming_llm import StreamingLLM
from kvpress.policies.tova import TOVA

REGISTRY = {
    "h2o": H2O,
    "knorm": Knorm,
    "random": RandomPolicy,
    "snapkv": SnapKV,
    "streamingllm": StreamingLLM,
    "tova": TOVA,
}

__all__ = ["H2O", "Knorm", "RandomPolicy", "REGISTRY", "SnapKV", "StreamingLLM", "TOVA"]
