"""End to end on SmolLM2-135M-Instruct with the retrieval prompts of tests/retrieval.py.

Recorded answer counts (first case of RETRIEVAL_CASES; 1.5k-token prompts cost ~10 s each on CPU, so
this module checks a few policies only; benchmarks/policies.py compares all of them). A policy fails
if it answers fewer than recorded.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvpress.policies import A2SF, VATP, AdaKV, SnapKV, SpAtten

from kvpress import PrunedCache, load_model
from tests.retrieval import RETRIEVAL_CASES, count_answered

CASES = RETRIEVAL_CASES[:1]
RECORDED = {  # (policy, budget): answered out of len(CASES); measured on CPU, fp32
    "a2sf@0.5": (lambda: A2SF(budget=0.5), 0),
    "vatp(snapkv)@0.2": (lambda: VATP(SnapKV(budget=0.2)), 0),
    "adakv(snapkv)@0.2": (lambda: AdaKV(SnapKV(budget=0.2)), 0),
    "spatten@0.5": (lambda: SpAtten(budget=0.5), 0),
}


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


@pytest.mark.real_model
@pytest.mark.parametrize("name", list(RECORDED))
def test_answers_at_least_the_recorded_count(smollm2, name):
    make, recorded = RECORDED[name]
    model, tokenizer = smollm2
    answered = count_answered(model, tokenizer, lambda: PrunedCache(make()), CASES)
    assert answered >= recorded, f"{name}: {answered} of {len(CASES)} answered, recorded {recorded}"
