"""One tree's side of an A/B between two commits (issue 20's restructuring: same ops, no slower).

    OMP_NUM_THREADS=1 python benchmarks/side_by_side.py ops      # aten ops and host syncs per decoding step
    OMP_NUM_THREADS=1 python benchmarks/side_by_side.py decode   # decode time per token vs DynamicCache

It measures whatever `kvpress` imports, with that tree's `benchmarks/overhead.py` (`--overhead`). For an
older commit: `git archive OLD kvpress policies triton_kernels longbench benchmarks | tar -x -C /tmp/old`,
move `policies`, `triton_kernels` and `longbench` into `/tmp/old/kvpress/`, then run this script from a
folder outside the checkout with `PYTHONPATH=/tmp/old` and `--overhead /tmp/old/benchmarks/overhead.py`;
alternate the two trees run by run. SmolLM2-135M-Instruct, fp32, CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from pathlib import Path

import torch
from transformers import DynamicCache

import kvpress
from kvpress import PrunedCache, load_model
from kvpress.policies import H2O, TOVA, AdaKV, SnapKV


def overhead_module(path: str):
    spec = importlib.util.spec_from_file_location("overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ops(overhead, model) -> list[str]:
    """aten ops and syncs per decoding step after a 1000-token prompt (8 steps)."""
    ids = torch.randint(3, model.config.vocab_size, (1, 1000), generator=torch.Generator().manual_seed(4))
    caches = (("DynamicCache", DynamicCache), ("PrunedCache(None)", lambda: PrunedCache(None)),
              ("H2O 0.5", lambda: PrunedCache(H2O(budget=0.5))), ("SnapKV 0.5", lambda: PrunedCache(SnapKV(budget=0.5))),
              ("TOVA 0.5", lambda: PrunedCache(TOVA(budget=0.5))),
              ("AdaKV(SnapKV) 0.5", lambda: PrunedCache(AdaKV(SnapKV(budget=0.5)))))
    return [f"{name}: ops {count:.0f}, syncs {syncs:.0f}"
            for name, make in caches for count, syncs in [overhead.decode_ops(model, ids, make)]]


def decode(overhead, model) -> list[str]:
    """Decode time per token over DynamicCache's, three alternating repeats of 16 steps, median."""
    lines = []
    for label, length, make in (("no eviction, 512-token prompt", 512, lambda: PrunedCache(None)),
                                ("H2O 0.5 slack 0, 1000-token prompt", 1000, lambda: PrunedCache(H2O(budget=0.5))),
                                ("H2O 512 slack 0, 2048-token prompt", 2048,
                                 lambda: PrunedCache(H2O(budget=512, window=32)))):
        ids = torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        ratios = []
        for _ in range(3):
            base = overhead.decode_per_token(model, ids, DynamicCache, 16)
            ratios.append(overhead.decode_per_token(model, ids, make, 16) / base)
        lines.append(f"{label}: {statistics.median(ratios):.3f}x ({', '.join(f'{r:.3f}' for r in ratios)})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["ops", "decode"])
    parser.add_argument("--overhead", default=str(Path(__file__).with_name("overhead.py")))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model("smollm2")  # no progress= here: older trees lack it
    print(f"kvpress from {Path(kvpress.__file__).parent}")
    print("\n".join((ops if args.what == "ops" else decode)(overhead_module(args.overhead), model)))


if __name__ == "__main__":
    main()
