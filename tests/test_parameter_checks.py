"""Every policy's hyperparameter checks: a bad value raises `ValueError` naming the policy, the field,
the accepted range and the value given (docs/architecture.md: one validation helper,
kvpress/budgets.py). Good values of the same fields build."""

import pytest

from kvpress import PrunedCache
from kvpress.policies import (
    A2SF,
    CAOTE,
    H2O,
    VATP,
    AdaKV,
    ExpectedAttention,
    GraphKV,
    KVCompose,
    KVzip,
    PagedEviction,
    PyramidKV,
    QuantizedPruning,
    SnapKV,
    Span,
    SpAtten,
)

CASES = [
    (lambda v: A2SF(forgetting=v), 0.0, 0.5, r"A2SF: forgetting must be a number in \(0, 1\], got 0.0"),
    (lambda v: A2SF(forgetting=v), True, 1.0, r"A2SF: forgetting must be a number in \(0, 1\], got True"),
    (lambda v: AdaKV(SnapKV(budget=64), floor=v), 1.5, 0.0, r"AdaKV: floor must be a number in \[0, 1\], got 1.5"),
    (lambda v: PyramidKV(SnapKV(budget=64), beta=v), 0.5, 1, r"PyramidKV: beta must be a number >= 1 \(top/bottom"),
    (lambda v: VATP(H2O(budget=64), sink_tokens=v), -1, 0, r"VATP: sink_tokens must be an int >= 0, got -1"),
    (lambda v: GraphKV(H2O(budget=64), neighbours=v), 0, 1, r"GraphKV: neighbours must be an int >= 1, got 0"),
    (lambda v: GraphKV(H2O(budget=64), rounds=v), 2.0, 3, r"GraphKV: rounds must be an int >= 1, got 2.0"),
    (lambda v: GraphKV(H2O(budget=64), seeds=v), 1.5, 0.5, r"GraphKV: seeds must be an int >= 1 or a float in \(0, 1\]"),
    (lambda v: SpAtten(budget=64, head_keep=v), 0.0, 1.0, r"SpAtten: head_keep must be a number in \(0, 1\], got 0.0"),
    (lambda v: SpAtten(budget=64, token_beta=v), 0.9, 1, r"SpAtten: token_beta must be a number >= 1, got 0.9"),
    (lambda v: SnapKV(budget=64, window=v), 0, 1, r"SnapKV: window must be >= 1 \(the observation window\), got 0"),
    (lambda v: Span(H2O(budget=64), kernel=v), 4, 5, r"Span: kernel must be an odd int >= 1"),
    (lambda v: ExpectedAttention(budget=64, future=v), 0, 1, r"ExpectedAttention: future must be an int >= 1 \(positions"),
    (lambda v: ExpectedAttention(budget=64, covariance=v), 1, False, r"ExpectedAttention: covariance must be a bool"),
    (lambda v: ExpectedAttention(budget=64, epsilon=v), -0.1, 0.0, r"ExpectedAttention: epsilon must be a number >= 0"),
    (lambda v: ExpectedAttention(budget=64, decay=v), 1.5, 0.9, r"ExpectedAttention: decay must be a number in \(0, 1\]"),
    (lambda v: KVCompose(budget=64, structured=v), "yes", False, r"KVCompose: structured must be a bool \(True or False\)"),
    (lambda v: KVCompose(budget=64, keep_token_lower_bound=v), -2, 3, r"KVCompose: keep_token_lower_bound must be an int >= 0"),
    (lambda v: PagedEviction(budget=64, block_size=v), 0, 4, r"PagedEviction: block_size must be an int >= 1 \(slots per"),
    (lambda v: KVzip(budget=64, chunk_size=v), False, 64, r"KVzip: chunk_size must be an int >= 1, got False"),
    (lambda v: QuantizedPruning(SnapKV(budget=64), memory=4096, per_layer=v), 1, True,
     r"QuantizedPruning: per_layer must be a bool"),
    (lambda v: CAOTE(H2O(budget=64), fast=v), None, True, None),  # no check of its own: any value builds
    (lambda v: PrunedCache(H2O(budget=64), slack=v), 1.0, 4, r"PrunedCache: slack must be an int >= 0, got 1.0"),
]


@pytest.mark.parametrize("make,bad,good,message", CASES)
def test_bad_hyperparameters_name_the_policy_field_and_range(make, bad, good, message):
    make(good)
    if message is None:
        make(bad)
        return
    with pytest.raises(ValueError, match=message):
        make(bad)
