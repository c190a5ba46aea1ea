"""Eviction policies, one module each. `REGISTRY` maps lowercase names to classes (spec strings,
`kvpress policies`)."""

from kvpress.policies.a2sf import A2SF
from kvpress.policies.adakv import AdaKV
from kvpress.policies.caote import CAOTE
from kvpress.policies.expected_attention import ExpectedAttention
from kvpress.policies.graphkv import GraphKV
from kvpress.policies.h2o import H2O
from kvpress.policies.knorm import Knorm
from kvpress.policies.kvcompose import KVCompose
from kvpress.policies.paged_eviction import PagedEviction
from kvpress.policies.kvzip import KVzip, ReconstructionPrompt, kvzip_prefill
from kvpress.policies.lazyllm import LazyLLM
from kvpress.policies.pyramidkv import PyramidKV
from kvpress.policies.quantized_pruning import QuantizedPruning
from kvpress.policies.random_policy import RandomPolicy
from kvpress.policies.snapkv import SnapKV
from kvpress.policies.span import Span
from kvpress.policies.spatten import SpAtten
from kvpress.policies.streaming_llm import StreamingLLM
from kvpress.policies.tova import TOVA
from kvpress.policies.vatp import VATP

REGISTRY = {
    "h2o": H2O,
    "knorm": Knorm,
    "random": RandomPolicy,
    "snapkv": SnapKV,
    "streamingllm": StreamingLLM,
    "tova": TOVA,
    "quantizedpruning": QuantizedPruning,
    "a2sf": A2SF,
    "vatp": VATP,
    "caote": CAOTE,
    "graphkv": GraphKV,
    "spatten": SpAtten,
    "pyramidkv": PyramidKV,
    "adakv": AdaKV,
    "kvcompose": KVCompose,
    "pagedeviction": PagedEviction,
    "expectedattention": ExpectedAttention,
    "span": Span,
    "kvzip": KVzip,
    "lazyllm": LazyLLM,
}

__all__ = [
    "A2SF",
    "CAOTE",
    "H2O",
    "REGISTRY",
    "TOVA",
    "VATP",
    "AdaKV",
    "ExpectedAttention",
    "GraphKV",
    "KVCompose",
    "KVzip",
    "LazyLLM",
    "Knorm",
    "PagedEviction",
    "PyramidKV",
    "QuantizedPruning",
    "RandomPolicy",
    "ReconstructionPrompt",
    "SnapKV",
    "SpAtten",
    "Span",
    "StreamingLLM",
    "kvzip_prefill",
]
