"""Sliding-window layers keep transformers' own layer and are never pruned, whether the cache learns
the layer types from `config=` or from the model at its first forward."""

import pytest
import torch
from tiny_models import random_ids, tiny_model
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvpress import PrunedCache, PrunedLayer
from kvpress.policies import H2O


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
@pytest.mark.parametrize("with_config", [True, False])
def test_sliding_layers_are_left_to_transformers(family, with_config):
    model = tiny_model(family, "eager")
    layer_types = model.config.layer_types
    cache = PrunedCache(H2O(budget=12, window=2), config=model.config if with_config else None)
    model.generate(random_ids(1, 30), cache=cache, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for kind, layer, row in zip(layer_types, cache.layers, cache.report().layers):
        if kind == "sliding_attention":
            assert isinstance(layer, DynamicSlidingWindowLayer) and not row.pruned
            assert layer.keys.shape[-2] < model.config.sliding_window
        else:
            assert isinstance(layer, PrunedLayer) and row.pruned
            assert layer.kept_slots == 12
    assert cache.get_seq_length() == 33


def test_sliding_window_on_a_pruned_layer_is_refused():
    model = tiny_model("mistral", "eager", sliding_window=8)
    cache = PrunedCache(H2O(budget=12, window=2))
    cache.types_known = True  # as if the cache had been told every layer is full attention
    with pytest.raises(NotImplementedError, match="sliding-window attention.*config=model.config"), \
            torch.no_grad():
        model(random_ids(1, 20), cache=cache)
