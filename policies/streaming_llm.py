"""StreamingLLM: attention sinks plus the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.policy import Policy


@dataclass
class StreamingLLM(Policy):
    """Keep the first `sinks` tokens and the most recent ones; no scores.

    Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453.
    Score = token position (newest kept first); the sinks are protected. Kept keys keep their true
    RoPE positions (the paper's re-rotation is for streaming past the training length).
    Defaults: 4 sinks (the paper's), budget 0.25 of the tokens seen.
    """

    spec_name = "streamingllm"

    budget: int | float = 0.25
    sinks: int = 4
    window: int = 0

    def score(self, layer) -> torch.Tensor:
        return layer.positions.float()
