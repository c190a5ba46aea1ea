"""More tokens at lower precision, at equal memory (SmolLM2-135M-Instruct, fp32, CPU).

Memory budget per prompt: the bytes of keys and values of 25% of the prompt in the model's dtype (fp32
here, so a full-precision slot costs 32 bits per element). Methods:
- eviction only: SnapKV keeping `budget = 25%` of the prompt, full precision;
- quantization only (every token kept): transformers' `QuantizedCache` (quanto and HQQ backends,
  group 64, residual 128, their defaults) and kvpress `KVQuant` without eviction (group 32, residual
  32); their memory is whatever they need, shown in the `memory` column;
- quantized pruning: `QuantizedPruning(SnapKV(), memory=budget, bits=b)` at 8, 4 and 2 bits, and with
  the bit-choice rule (`bits=None`).

Tasks and scoring are those of `benchmarks/policies.py` (passkey in ~400 tokens of the Python language
reference, a fact in a document, next-token agreement with the full cache over 48 teacher-forced
steps). `memory` is the measured bytes of keys/values held at the end (codes, scales, zero points, block
counts, full-precision residual; eviction bookkeeping excluded), as a share of the fp32 prompt cache.

    OMP_NUM_THREADS=1 python benchmarks/quantized.py [--workers 2]

Writes `benchmarks/RESULTS_quantized.md`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache, QuantizedCache

from kvpress import KVQuant, PrunedCache, load_model
from kvpress.memory import kv_bytes
from kvpress.policies import QuantizedPruning, SnapKV

ROOT = Path(__file__).resolve().parents[1]
MEMORY_SHARE = 0.25

_spec = importlib.util.spec_from_file_location("policies_benchmark", ROOT / "benchmarks" / "policies.py")
tasks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tasks)


def prompt_bytes(model, tokens: int) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * tokens * model.dtype.itemsize


METHODS = {
    "full cache": lambda model, n, memory: DynamicCache(config=model.config),
    "eviction only: snapkv": lambda model, n, memory: PrunedCache(SnapKV(budget=int(n * MEMORY_SHARE))),
    "quant only: quanto 4-bit": lambda model, n, memory: QuantizedCache("quanto", model.config, nbits=4),
    "quant only: quanto 2-bit": lambda model, n, memory: QuantizedCache("quanto", model.config, nbits=2),
    "quant only: hqq 4-bit": lambda model, n, memory: QuantizedCache("hqq", model.config, nbits=4),
    "quant only: hqq 2-bit": lambda model, n, memory: QuantizedCache("hqq", model.config, nbits=2),
    "quant only: KVQuant 4-bit": lambda model, n, memory: PrunedCache(None, quantization=KVQuant(4, 32, 32)),
    "quant only: KVQuant 2-bit": lambda model, n, memory: PrunedCache(None, quantization=KVQuant(2, 32, 32)),
    "quantized pruning 8-bit": lambda model, n, memory: PrunedCache(QuantizedPruning(SnapKV(), memory=memory, bits=8)),
    "quantized pruning 4-bit": lambda model, n, memory: PrunedCache(QuantizedPruning(SnapKV(), memory=memory, bits=4)),
    "quantized pruning 2-bit": lambda model, n, memory: PrunedCache(QuantizedPruning(SnapKV(), memory=memory, bits=2)),
    "quantized pruning, rule": lambda model, n, memory: PrunedCache(QuantizedPruning(SnapKV(), memory=memory)),
}

_worker: dict = {}


def _init(references):
    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2")
    _worker.update(model=model, tokenizer=tokenizer, tasks=tasks.build_tasks(tokenizer), references=references)


def run_method(name: str):
    model, tokenizer = _worker["model"], _worker["tokenizer"]
    passkey, fact, agreement = _worker["tasks"]
    factory = METHODS[name]
    start = time.time()
    shares, slots = [], []

    def cache_for(ids):
        full = prompt_bytes(model, ids.shape[1])
        cache = factory(model, ids.shape[1], int(full * MEMORY_SHARE))
        return cache, full

    def account(cache, full):
        if not isinstance(cache, DynamicCache):
            shares.append(kv_bytes(cache) / full)
            layer = cache.layers[0]
            # tokens held: the valid slots of the fullest head (holes left by in-place eviction excluded)
            slots.append(getattr(layer, "kept_slots", None) or layer.get_seq_length())

    hits = {}
    for task, cases in (("passkey", passkey), ("fact", fact)):
        hits[task] = 0
        for ids, answer in cases:
            cache, full = cache_for(ids)
            hits[task] += tasks.answered(model, tokenizer, ids, answer, cache)
            account(cache, full)
        hits[task] /= len(cases)
    matches = 0
    for ids, reference in zip(agreement, _worker["references"]):
        cache, full = cache_for(ids)
        predictions = tasks.teacher_forced(model, ids, reference, cache)
        matches += sum(p == r for p, r in zip(predictions, reference))
        account(cache, full)
    hits["agreement"] = matches / (tasks.NEW_TOKENS * len(agreement))
    hits["memory"] = sum(shares) / len(shares) if shares else 1.0  # full cache: the prompt, plus new tokens
    hits["slots"] = sum(slots) / len(slots) if slots else None
    hits["seconds"] = time.time() - start
    return name, hits


def verdict(results) -> list[str]:
    """The paper's two claims, checked separately on `results` (method -> row)."""
    def mean_of(name):
        row = results[name]
        return (row["passkey"] + row["fact"] + row["agreement"]) / 3

    def retrieval(name):
        return results[name]["passkey"] + results[name]["fact"]

    evict = mean_of("eviction only: snapkv")
    lines = ["", "## Does the paper's finding hold here?", "",
             (f"- Eviction only (SnapKV, full precision) at the memory budget: mean {evict:.3f}, retrieval "
             f"{retrieval('eviction only: snapkv'):.2f}/2.")]
    wins = []
    for bits in (8, 4, 2):
        name = f"quantized pruning {bits}-bit"
        better = mean_of(name) > evict and retrieval(name) >= retrieval("eviction only: snapkv")
        wins.append(better)
        lines.append(f"- {name}: mean {mean_of(name):.3f}, retrieval {retrieval(name):.2f}/2, memory "
                     f"{results[name]['memory']:.3f}: {'beats' if better else 'does not beat'} eviction only.")
    best = max((8, 4, 2), key=lambda b: mean_of(f"quantized pruning {b}-bit"))
    lines += [
        (f"- Claim 1, more tokens at lower precision beat fewer tokens at full precision at equal memory: "
        f"**{'holds' if wins[0] and wins[1] else 'does not hold'}** at 8 and 4 bits; 2 bits "
        f"{'also wins' if wins[2] else 'loses (the paper: 2 bits collapses)'}."),
        (f"- Claim 2, 4 bits is the best trade-off: **{'holds' if best == 4 else 'does not hold'}** here "
        f"(best: {best} bits)."),
        ("- Caveats: 3 prompts per retrieval task (one prompt = 0.33), one agreement prompt; fp32 scales and "
        "zero points and the fp32 tail make low bit widths buy fewer extra tokens than the ideal 32/b "
        "(docs/quantization.md)."),
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS_quantized.md"))
    parser.add_argument("--methods", default=None,
                        help="method names separated by semicolons (default: all); the verdict needs "
                             "'eviction only: snapkv' and the three fixed-bit quantized pruning rows")
    args = parser.parse_args()
    methods = list(METHODS) if args.methods is None else [m.strip() for m in args.methods.split(";")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; accepted: {list(METHODS)}")
    torch.set_num_threads(1)
    started = time.time()
    model, tokenizer = load_model("smollm2")
    _, _, agreement = tasks.build_tasks(tokenizer)
    # an explicit cache: with cache=None every teacher-forced step would run without its history
    references = [tasks.teacher_forced(model, ids, None, DynamicCache(config=model.config)) for ids in agreement]
    del model
    with ProcessPoolExecutor(args.workers, initializer=_init, initargs=(references,)) as pool:
        results = dict(pool.map(run_method, methods))

    lines = [
        "# Quantized pruning at equal memory (SmolLM2-135M-Instruct, fp32, CPU)",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/quantized.py --workers {args.workers}"
        + (f" --methods \"{args.methods}\"" if args.methods else "") + "` "
        f"({time.time() - started:.0f} s on this machine).",
        "",
        (f"Memory budget: {MEMORY_SHARE:.0%} of each prompt's fp32 keys/values (~400-token prompts). `memory` = "
        "measured key/value bytes held at the end of each run / fp32 bytes of the prompt (mean over the 7 "
        "prompts); `slots` = mean tokens held per KV head in layer 0 at the end. Passkey and fact: share of 3 "
        "prompts answered (12 greedy tokens); agreement: next-token agreement with the full cache, 48 "
        "teacher-forced steps. Quantized pruning: SnapKV scores (window 32, kernel 7, max pooling), "
        "KIVI group 32, residual 0."),
        "",
        "| method | memory | slots | passkey | fact | agreement | mean | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in results.items():
        mean = (row["passkey"] + row["fact"] + row["agreement"]) / 3
        slot_text = f"{row['slots']:.0f}" if row["slots"] is not None else "all"
        lines.append(f"| {name} | {row['memory']:.3f} | {slot_text} | {row['passkey']:.2f} | {row['fact']:.2f} | "
                     f"{row['agreement']:.3f} | {mean:.3f} | {row['seconds']:.0f} |")

    needed = ["eviction only: snapkv"] + [f"quantized pruning {bits}-bit" for bits in (8, 4, 2)]
    if all(name in results for name in needed):
        lines += verdict(results)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
