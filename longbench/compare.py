"""Several policies against the full cache (``kvpress compare``): the full cache first, then each policy
in each compression mode, every compressed run scored against the full cache's predictions; the
comparison is printed and saved as ``compare.md``, ``compare.csv`` and ``compare.png``."""

from __future__ import annotations

import time
from pathlib import Path

from kvpress.spec import parse_spec

from .evaluate import progress_jobs, run_folder, run_one
from .plot import plot_comparison
from .prepare import prepare
from .progress import FileProgress
from .results import ComparedRun, comparison_csv, comparison_rows, comparison_table, per_task_table

COMPARE_POLICIES = ("full", "snapkv:budget=0.5", "snapkv:budget=0.2", "h2o:budget=0.5", "h2o:budget=0.2")


def compare_specs(specs: list[str]) -> list[str]:
    """The full cache first (added when missing: it is the fidelity reference), then the others."""
    parsed = [parse_spec(spec) for spec in specs]  # fails on a bad spec before anything is loaded
    full = [s.text for s in parsed if s.policy is None and not s.options]
    others = [s.text for s in parsed if s.policy is not None or s.options]
    return [full[0] if full else "full", *dict.fromkeys(others)]


def compare(args, specs: list[str]) -> None:
    """Run ``specs`` (from :func:`compare_specs`: the full cache first) into folders of ``args.out``,
    the full cache in question mode, the others in each mode of ``args.compress``; on rank 0 print
    and write the comparison."""
    wall = time.perf_counter()
    prep = prepare(args)
    plan = [(specs[0], "question")] + [(spec, mode) for mode in args.compress for spec in specs[1:]]
    folders = [run_folder(args.out, spec, mode, args.after_prompt) for spec, mode in plan]
    runs = []
    try:
        with FileProgress(progress_jobs(prep, folders), desc=f"compare ({prep.shard.world} workers)",
                          enabled=prep.shard.is_main and not args.no_progress):
            for index, ((spec, mode), folder) in enumerate(zip(plan, folders)):
                result = run_one(args, prep, spec, folder, compress=mode, progress=False, quiet=True,
                                 reference=folders[0] if index else None)
                if result is not None:
                    meta = result["run"]["metadata"]
                    runs.append(ComparedRun(spec, mode, result, meta["policy_name"], meta["budget"]))
    finally:
        prep.shard.close()
    if not runs:
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary, tasks_table = comparison_table(runs), per_task_table(runs)
    heading = (f"LongBench ({prep.source.describe()} data, model {args.model}, {prep.shard.world} worker(s), "
               f"{time.perf_counter() - wall:.0f} s wall)")
    (out / "compare.md").write_text(f"{heading}\n\n{summary}\n\nPer task, score / fidelity:\n\n{tasks_table}\n",
                                    encoding="utf-8")
    (out / "compare.csv").write_text(comparison_csv(runs), encoding="utf-8")
    figure = plot_comparison(comparison_rows(runs), out / "compare.png")
    print(f"\n{heading}\n{summary}\n\nPer task, score / fidelity:\n{tasks_table}")
    print(f"\nfidelity: each task's metric with the full cache's predictions as references (100 = same "
          f"answers); KV bytes vs DynamicCache: bytes held over the key/value bytes transformers' DynamicCache "
          f"holds for the same tokens (computed from the tokens seen and the model's shape); written: {out / 'compare.md'}, {out / 'compare.csv'}, {figure}")
