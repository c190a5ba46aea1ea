"""One policy on LongBench: predict into a run folder, score it (with fidelity to a full-cache run when
given), write and print its reports; also the work of ``kvpress longbench`` and ``kvpress longbench
score`` once their options are parsed."""

from __future__ import annotations

import os
import re
import sys
import time

from kvpress.spec import build_cache, parse_spec

from . import runner
from .prepare import Prepared, prepare
from .progress import FileProgress
from .results import score_run, v2_table, write_reports


def run_folder(parent: str, spec: str, compress: str, after_prompt: str = "evict") -> str:
    """The folder of one run under ``parent``: the spec made file-safe, ``-context`` and ``-append`` for
    those modes."""
    slug = re.sub(r"[^A-Za-z0-9.=_-]+", "-", spec).strip("-") or "run"
    return os.path.join(parent, slug + ("" if compress == "question" else "-context")
                        + ("" if after_prompt == "evict" else "-append"))


def run_one(args, prep: Prepared, spec_text: str, out_dir: str, *, compress: str = "question",
            reference: str | None = None, progress: bool = True, quiet: bool = False) -> dict | None:
    """Run one policy spec into ``out_dir``; on rank 0 score it (with fidelity to the full-cache run
    in ``reference`` when given), write the reports, return the result."""
    spec = parse_spec(spec_text)
    settings = runner.RunSettings(
        model=args.model, policy=spec.text, policy_resolved=spec.canonical(),
        tasks=[c.name for c in prep.configs], max_length=prep.max_length, v2_max_length=args.v2_max_length,
        chat_template=args.chat_template, data=prep.source.describe(), limit=args.limit,
        min_new_tokens_all=args.min_new_tokens_all, v2_template=args.v2_template, dtype=prep.dtype,
        attn_implementation=args.attn_implementation, compress=compress, after_prompt=args.after_prompt,
    )
    extra = {"policy_name": spec.name, "budget": spec.budget, "max_length_source": prep.max_length_source,
             "selection": "per KV head" if spec.policy is not None else None,
             "decode_time_eviction": None if spec.policy is None else spec.policy.evicts_during("decode")}
    config = prep.model.config
    start = time.perf_counter()
    complete = runner.run(settings, prep.configs, prep.source, prep.model, prep.tokenizer,
                          lambda: build_cache(spec, config, after_prompt=args.after_prompt), out_dir, prep.shard,
                          progress=progress and prep.shard.world == 1, header_extra=extra,
                          records=prep.records)
    if not prep.shard.is_main:
        return None
    result = score_run(out_dir, reference=reference)
    table = write_reports(out_dir, result)
    if not quiet:
        print(f"\n{spec.text}  ({out_dir}, {time.perf_counter() - start:.1f} s)")
        print(table)
        extra_table = v2_table(result)
        if extra_table:
            print("\nLongBench v2 accuracy\n" + extra_table)
    done = result["completeness"]
    if not complete or not done["complete"]:
        print("warning: incomplete run: " + "; ".join(done["notes"]), file=sys.stderr)
    elif not done["official_data"] and prep.source.kind != "sample" and args.limit is None:
        print("warning: the data is not the full official set: " + "; ".join(done["notes"]), file=sys.stderr)
    return result


def progress_jobs(prep: Prepared, out_dirs: list[str]) -> list[tuple[str, str, int]]:
    """(run folder, task, samples) for every run of a command, for the shared progress bar."""
    return [(out, c.name, len(prep.records[c.name])) for out in out_dirs for c in prep.configs]


def run_policy(args) -> None:
    """``kvpress longbench``: prepare, run ``args.policy`` into ``args.out`` (default
    ``runs/<policy>``), score it; one progress bar over every worker's files in a sharded run."""
    prep = prepare(args)
    out = args.out or run_folder("runs", args.policy, args.compress, args.after_prompt)
    shared_bar = prep.shard.world > 1 and prep.shard.is_main and not args.no_progress
    try:
        with FileProgress(progress_jobs(prep, [out]), desc=f"{args.policy} ({prep.shard.world} workers)",
                          enabled=shared_bar):
            run_one(args, prep, args.policy, out, compress=args.compress, progress=not args.no_progress)
    finally:
        prep.shard.close()


def score_folders(folders: list[str], reference: str | None = None) -> None:
    """``kvpress longbench score``: score each run folder, write its reports, print its tables and notes."""
    for folder in folders:
        result = score_run(folder, reference=reference)
        print(f"{folder}  ({result['run']['config']['policy']})")
        print(write_reports(folder, result))
        extra = v2_table(result)
        if extra:
            print("\nLongBench v2 accuracy\n" + extra)
        for note in result["completeness"]["notes"]:
            print(f"note: {note}", file=sys.stderr)
