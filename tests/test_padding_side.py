"""Right padding is refused at the first forward for every registered policy: observation windows and
recent tokens count from the end of a row, so a right-padded row would not equal itself alone. Left
padding, and a masked token inside a row, run."""

import pytest
import torch
from registry_policies import make_policy, prefill
from tiny_models import random_ids, tiny_model

from kvpress import PrunedCache
from kvpress.policies import REGISTRY


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return tiny_model("llama", request.param)


def right_padded():
    ids = random_ids(2, 24, seed=3)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    return ids, mask


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_right_padding_is_refused_naming_the_fix(model, name):
    ids, mask = right_padded()
    with pytest.raises(ValueError, match=r"rows \[1\] are padded on the right.*pad on the left|pad on the left"), \
            torch.no_grad():
        prefill(model, ids, PrunedCache(make_policy(name, 10)), attention_mask=mask)


def test_left_padding_and_a_row_of_padding_only_so_far_run(model):
    ids, _ = right_padded()
    left = torch.ones_like(ids)
    left[1, :5] = 0
    chunk = torch.ones_like(ids)
    chunk[1] = 0  # a chunked prefill's first chunk of a short, left-padded row
    with torch.no_grad():
        model(ids, attention_mask=left, cache=PrunedCache(make_policy("h2o", 10)), use_cache=True)
        model(ids, attention_mask=chunk, cache=PrunedCache(make_policy("snapkv", 10)), use_cache=True)


def test_a_chunk_that_ends_in_padding_after_earlier_real_tokens_is_refused(model):
    first = random_ids(1, 12, seed=4)
    more = random_ids(1, 4, seed=5)
    for tail, refused in (([1, 1, 0, 0], True), ([0, 0, 0, 0], True), ([0, 1, 0, 1], False)):
        cache = PrunedCache(make_policy("h2o", 10))
        mask = torch.cat([torch.ones_like(first), torch.tensor([tail])], dim=1)
        with torch.no_grad():
            model(first, attention_mask=torch.ones_like(first), cache=cache, use_cache=True)
            if refused:
                with pytest.raises(ValueError, match="padded on the right"):
                    model(more, attention_mask=mask, cache=cache, use_cache=True)
            else:  # a masked token inside the row: the row alone has it too
                model(more, attention_mask=mask, cache=cache, use_cache=True)
