"""AdaKV's per-head counts while decoding."""

import torch
from tiny_models import random_ids, tiny_model

from kvpress import PrunedCache
from kvpress.policies import AdaKV, SnapKV


def test_adakv_keeps_the_layer_total_while_decoding():
    """Decoding evicts in place, so a head whose share shrank cannot get its evicted slots back when
    its share grows again; what it cannot use goes to the other heads, and every row keeps the uniform
    total of its layer (within half a slot per head), step after step."""
    model = tiny_model("llama", "eager", num_key_value_heads=4, num_attention_heads=8)
    policy = AdaKV(SnapKV(budget=0.3, window=4))
    cache = PrunedCache(policy)
    with torch.no_grad():
        logits = model(random_ids(2, 400, seed=3), cache=cache).logits
        for _ in range(16):
            logits = model(logits[:, -1:].argmax(-1), cache=cache).logits
            for layer in cache.layers:
                held = layer.valid.sum(dim=(1, 2))  # [B]
                uniform = policy.inner.keep_counts(layer).sum(-1)  # [B]
                assert bool(((held - uniform).abs() <= layer.num_heads / 2).all()), (held, uniform)
