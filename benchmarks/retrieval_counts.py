"""Answers of every policy configuration on the end-to-end retrieval prompts (tests/retrieval.py,
the first three cases), with SmolLM2-135M-Instruct on CPU: how many greedy answers contain the fact,
and the mean negative log-likelihood of the fact's tokens teacher-forced after the prompt. The first
two rows are the references tests/test_real_model.py computes itself: transformers' `DynamicCache`
with the fact, and without it (the prompt with the fact left out: what the model guesses).

    OMP_NUM_THREADS=1 python benchmarks/retrieval_counts.py [--shard i/n]

`--policies 'snapkv;kvcompose'` runs those spec names at budgets 0.5 and 0.2 (plus the full cache)
instead of the recorded configurations (policies measured here but not recorded by the test);
`--specs 'lazyllm;lazyllm:schedule=0.5:0.7/0.75:0.5'` runs those whole spec strings (plus the full cache).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from retrieval import E2E_CASES, answer_and_nll, policy_configs
from transformers import DynamicCache

from kvpress import load_model
from kvpress.spec import build_cache, parse_spec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th configuration starting at i")
    parser.add_argument("--policies", default=None, help="semicolon-separated spec names to run instead")
    parser.add_argument("--specs", default=None, help="semicolon-separated whole spec strings to run instead")
    args = parser.parse_args()
    index, count = map(int, args.shard.split("/"))
    configs = policy_configs()
    if args.policies is not None:
        configs = {"full": "full"}
        for budget in (0.5, 0.2):
            configs.update({f"{name}@{budget}": f"{name}{',' if ':' in name else ':'}budget={budget}"
                            for name in args.policies.split(";")})
    if args.specs is not None:
        configs = {"full": "full", **{spec: spec for spec in args.specs.split(";")}}
    model, tokenizer = load_model("smollm2")
    rows = {"DynamicCache": None, "DynamicCache, no fact": None, **configs}
    for position, (name, spec_text) in enumerate(rows.items()):
        if position % count != index:
            continue
        start = time.perf_counter()
        if spec_text is None:
            results = [answer_and_nll(model, tokenizer, DynamicCache(config=model.config), case,
                                      with_fact=name == "DynamicCache") for case in E2E_CASES]
        else:
            spec = parse_spec(spec_text)
            results = [answer_and_nll(model, tokenizer, build_cache(spec), case) for case in E2E_CASES]
        answered = [ok for ok, _ in results]
        nll = sum(value for _, value in results) / len(results)
        print(f"{name:24s} {sum(answered)}/{len(answered)} {answered} nll {nll:.3f} "
              f"{time.perf_counter() - start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
