"""Tiny random-weight decoder models, one per supported family, and input helpers."""

from __future__ import annotations

import torch
import transformers

COMMON = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),  # sliding_window 4096
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"use_sliding_window": False}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 6,
                "attn_logit_softcapping": 20.0, "final_logit_softcapping": 30.0,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 6,
                "layer_types": ["sliding_attention", "full_attention", "full_attention"]}),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {"sliding_window": 2047}),  # as published
}
if tuple(int(part) for part in transformers.__version__.split(".")[:2]) >= (5, 25):
    # from 5.25 Falcon resolves attention through the interface; RoPE with grouped KV heads (Falcon-40B/180B
    # layout). ALiBi Falcon is refused by the library.
    FAMILIES["falcon"] = (transformers.FalconConfig, transformers.FalconForCausalLM,
                          {"new_decoder_architecture": True, "num_kv_heads": 2, "alibi": False})
# Gemma2 refuses sdpa at load time.
IMPLEMENTATIONS = {name: ("eager",) if name == "gemma2" else ("sdpa", "eager") for name in FAMILIES}


def tiny_model(family: str = "llama", attn: str = "sdpa", seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**COMMON, **extra, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # random weights give near-uniform attention; sharpen it so that scores carry signal
    for module in model.modules():
        if hasattr(module, "q_proj"):
            module.q_proj.weight.data *= 4.0
        elif hasattr(module, "query_key_value") and hasattr(module, "num_kv_heads"):  # Falcon's fused qkv
            grouped = module.query_key_value.weight.data.view(module.num_kv_heads, -1, module.head_dim, config.hidden_size)
            grouped[:, :-2] *= 4.0  # each KV group's query rows come before its key and value
    return model


FAMILY_IMPL = [(f, a) for f in FAMILIES for a in IMPLEMENTATIONS[f]]


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask
