"""Answers of every policy configuration on the end-to-end retrieval prompts (tests/retrieval.py,
the first three cases), with SmolLM2-135M-Instruct on CPU. The counts recorded in
tests/test_real_model.py come from this command:

    OMP_NUM_THREADS=1 python benchmarks/retrieval_counts.py [--shard i/n]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from retrieval import E2E_CASES, answers, policy_configs

from kvpress import load_model
from kvpress.spec import build_cache, parse_spec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th configuration starting at i")
    index, count = map(int, parser.parse_args().shard.split("/"))
    model, tokenizer = load_model("smollm2")
    for position, (name, spec_text) in enumerate(policy_configs().items()):
        if position % count != index:
            continue
        start = time.perf_counter()
        spec = parse_spec(spec_text)
        result = answers(model, tokenizer, lambda: build_cache(spec), E2E_CASES)
        print(f"{name:24s} {sum(result)}/{len(result)} {result} {time.perf_counter() - start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
