"""The ``kvpress`` command (usage: :data:`USAGE`, printed by ``kvpress --help``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from pathlib import Path

USAGE = """\
usage: kvpress COMMAND [options]       (kvpress COMMAND --help for the options of one command)

commands:
  compare                 LongBench for several policies against the full cache: score, fidelity to
                          the full cache, KV bytes, time; writes compare.md/.csv/.png
                          (default: bundled sample, embedded SmolLM2-135M-Instruct, offline)
  longbench               LongBench (v1, LongBench-E, v2) with one policy into a run folder
  longbench score DIR...  score run folders (result.json, results.md, results.csv)
  longbench plot DIR...   plot run folders against budget
  policies                list the policies with their parameters and defaults

sharded runs: torchrun --nproc-per-node N -m kvpress.longbench [options]   (or --workers N)"""

DEFAULT_SAMPLE_MAX_LENGTH = 7500
COMPARE_POLICIES = ("full", "snapkv:budget=0.5", "snapkv:budget=0.2", "h2o:budget=0.5", "h2o:budget=0.2")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "-", spec).strip("-") or "run"


def add_run_options(parser: argparse.ArgumentParser, with_policy: bool = True) -> None:
    """Options shared by ``kvpress longbench`` and ``kvpress compare``."""
    from kvpress.longbench.data import SOURCES
    from kvpress.longbench.prompts import CHAT_TEMPLATE_MODES, V2_TEMPLATES
    from kvpress.longbench.runner import V2_MAX_LENGTH

    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a HF path/id")
    if with_policy:
        parser.add_argument("--policy", default="full", help="policy spec, e.g. 'snapkv:budget=1024,window=32'")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated tasks (v1 names, <task>_e, v2) or groups all, en16, zh, e; "
                             "default: every task of the bundled sample, or 'all' with other data")
    parser.add_argument("--max-length", type=_positive("--max-length"), default=None,
                        help="middle-truncate v1/LongBench-E prompts to this many tokens (default: the "
                             "model's value in model2maxlen.json; required with real data for other models; "
                             f"{DEFAULT_SAMPLE_MAX_LENGTH} for the bundled sample)")
    parser.add_argument("--v2-max-length", type=_positive("--v2-max-length"), default=V2_MAX_LENGTH,
                        help=f"middle-truncate LongBench v2 prompts to this many tokens (default {V2_MAX_LENGTH}, "
                             "the official value; never taken from --max-length)")
    parser.add_argument("--chat-template", default="official", choices=CHAT_TEMPLATE_MODES)
    parser.add_argument("--data", default="auto", choices=SOURCES,
                        help="auto: --data-dir if given, else the bundled sample (the network is never "
                             "consulted); hub: download the official files")
    parser.add_argument("--data-dir", default=None, help="folder of official <config>.jsonl files")
    parser.add_argument("--limit", type=_positive("--limit"), default=None, help="first N samples of each task")
    parser.add_argument("--min-new-tokens-all", action="store_true",
                        help="forbid EOS as first token on every task (SnapKV/PyramidKV protocol)")
    parser.add_argument("--v2-template", default="0shot", choices=[t for t in V2_TEMPLATES
                                                                   if t not in ("0shot_cot_ans", "0shot_rag")])
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--device", default="auto", help="auto: cuda:LOCAL_RANK if available, else cpu")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--workers", type=_positive("--workers"), default=1,
                        help="local processes sharing the samples (like torchrun --nproc-per-node)")


def _positive(name: str):
    """An argparse type: an int >= 1, with an error naming the option and the accepted range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {text!r}")
        return value

    return parse


def _device(name: str, local_rank: int) -> str:
    import torch

    if name != "auto":
        return name
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def _dtype(name: str, device: str) -> str:
    return ("float32" if device == "cpu" else "bfloat16") if name == "auto" else name


@dataclasses.dataclass
class Prepared:
    """Everything a run needs besides the policy: data, tasks, records, model, tokenizer, shard."""

    source: object
    configs: list
    records: dict
    model: object
    tokenizer: object
    shard: object
    max_length: int | None
    max_length_source: str
    dtype: str


def resolve_max_length(given: int | None, model: str, source_kind: str) -> tuple[int, str]:
    """The v1 truncation length: --max-length, else the model's entry in model2maxlen.json, else the
    bundled sample's default; real data with an unknown model needs --max-length."""
    from kvpress.longbench.tasks import known_max_length

    if given is not None:
        return given, "--max-length"
    known = known_max_length(model)
    if known is not None:
        return known
    if source_kind == "sample":
        return DEFAULT_SAMPLE_MAX_LENGTH, "bundled-sample default"
    raise ValueError(f"--max-length is required with real data for model {model!r} (not in model2maxlen.json): "
                     "e.g. 3500 for 4k-context models, 7500 for 8k, 31500 for 32k (the official head-room of "
                     "500 tokens)")


def prepare(args) -> Prepared:
    """Join the process group, let rank 0 pick the data source and send it to every rank, load the
    records (rank 0 first: it downloads and extracts hub files once) and the model."""
    import torch

    from kvpress.longbench.data import DataSource, resolve_source, sample_tasks
    from kvpress.longbench.distributed import Shard
    from kvpress.longbench.runner import load_records
    from kvpress.longbench.tasks import parse_task_list
    from kvpress.models import load_model

    shard = Shard.from_env()
    try:
        decided = resolve_source(args.data, args.data_dir) if shard.is_main else None
        source = DataSource(*shard.broadcast(None if decided is None else (decided.kind, decided.path)))
        if shard.is_main and source.kind == "sample" and args.data == "auto":
            print("kvpress: using the bundled LongBench sample (give --data-dir FOLDER or --data hub for the "
                  "official data)", file=sys.stderr)
        configs = parse_task_list(args.tasks or (",".join(sample_tasks()) if source.kind == "sample" else "all"))
        max_length, max_length_source = resolve_max_length(args.max_length, args.model, source.kind)
        records = load_records(configs, source, args.limit) if shard.is_main else None
        shard.barrier()
        if records is None:
            records = load_records(configs, source, args.limit)
        device = _device(args.device, shard.local_rank)
        dtype = _dtype(args.dtype, device)
        model, tokenizer = load_model(args.model, dtype=getattr(torch, dtype),
                                      attn_implementation=args.attn_implementation, device=device)
    except BaseException:
        shard.close()
        raise
    return Prepared(source, configs, records, model, tokenizer, shard, max_length, max_length_source, dtype)


def run_one(args, prep: Prepared, spec_text: str, out_dir: str, *, compress: str = "question",
            reference: str | None = None, progress: bool = True, quiet: bool = False) -> dict | None:
    """Run one policy spec into ``out_dir``; on rank 0 score it (with fidelity to the full-cache run
    in ``reference`` when given), write the reports, return the result."""
    from kvpress.longbench import runner
    from kvpress.longbench.results import score_run, v2_table, write_reports
    from kvpress.spec import build_cache, parse_spec

    spec = parse_spec(spec_text)
    settings = runner.RunSettings(
        model=args.model, policy=spec.text, policy_resolved=spec.canonical(),
        tasks=[c.name for c in prep.configs], max_length=prep.max_length, v2_max_length=args.v2_max_length,
        chat_template=args.chat_template, data=prep.source.describe(), limit=args.limit,
        min_new_tokens_all=args.min_new_tokens_all, v2_template=args.v2_template, dtype=prep.dtype,
        attn_implementation=args.attn_implementation, compress=compress,
    )
    extra = {"policy_name": spec.name, "budget": spec.budget, "max_length_source": prep.max_length_source,
             "selection": "per KV head" if spec.policy is not None else None,
             "decode_time_eviction": None if spec.policy is None else spec.policy.evicts_during("decode")}
    config = prep.model.config
    start = time.perf_counter()
    complete = runner.run(settings, prep.configs, prep.source, prep.model, prep.tokenizer,
                          lambda: build_cache(spec, config), out_dir, prep.shard,
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


def _spawned(command: str, argv: list[str], workers: int) -> int | None:
    """Re-launch this command in ``workers`` local processes unless already inside a sharded run."""
    if workers <= 1 or "WORLD_SIZE" in os.environ:
        return None
    from kvpress.longbench.distributed import spawn_local

    return spawn_local([command, *argv], workers)


def longbench_run(argv: list[str]) -> int:
    from kvpress.longbench.runner import COMPRESS_MODES

    parser = argparse.ArgumentParser(
        prog="kvpress longbench", description="Run LongBench with a cache policy.",
        epilog="Also: 'kvpress longbench score DIR...', 'kvpress longbench plot DIR... [--out FOLDER]'. "
               "Sharded: torchrun --nproc-per-node N -m kvpress.longbench [options] (or --workers N).")
    add_run_options(parser)
    parser.add_argument("--compress", default="question", choices=COMPRESS_MODES,
                        help="question: compress the whole prompt (SnapKV/KVCache-Factory protocol); context: "
                             "compress the context before the question is seen (NVIDIA kvpress/SCBench)")
    parser.add_argument("--out", default=None, help="run folder (default runs/<policy>)")
    args = parser.parse_args(argv)
    from kvpress.longbench.progress import FileProgress
    from kvpress.spec import parse_spec

    parse_spec(args.policy)  # fail on a bad spec before loading anything
    code = _spawned("longbench", argv, args.workers)
    if code is not None:
        return code
    prep = prepare(args)
    out = args.out or os.path.join("runs", _slug(args.policy) + ("" if args.compress == "question" else "-context"))
    shared_bar = prep.shard.world > 1 and prep.shard.is_main and not args.no_progress
    try:
        with FileProgress(progress_jobs(prep, [out]), desc=f"{args.policy} ({prep.shard.world} workers)",
                          enabled=shared_bar):
            run_one(args, prep, args.policy, out, compress=args.compress, progress=not args.no_progress)
    finally:
        prep.shard.close()
    return 0


def longbench_score(argv: list[str]) -> int:
    from kvpress.longbench.results import score_run, v2_table, write_reports

    parser = argparse.ArgumentParser(prog="kvpress longbench score", description="Score a run folder.")
    parser.add_argument("dirs", nargs="+", help="run folder(s)")
    parser.add_argument("--reference", default=None,
                        help="full-cache run folder of the same data and protocol: adds the fidelity columns")
    args = parser.parse_args(argv)
    for folder in args.dirs:
        result = score_run(folder, reference=args.reference)
        print(f"{folder}  ({result['run']['config']['policy']})")
        print(write_reports(folder, result))
        extra = v2_table(result)
        if extra:
            print("\nLongBench v2 accuracy\n" + extra)
        for note in result["completeness"]["notes"]:
            print(f"note: {note}", file=sys.stderr)
    return 0


def longbench_plot(argv: list[str]) -> int:
    from kvpress.longbench.plot import plot_runs

    parser = argparse.ArgumentParser(prog="kvpress longbench plot", description="Plot runs against budget.")
    parser.add_argument("dirs", nargs="+", help="run folders")
    parser.add_argument("--out", default="plots", help="folder for the PNG files")
    args = parser.parse_args(argv)
    for path in plot_runs(args.dirs, args.out):
        print(path)
    return 0


def longbench_main(argv: list[str]) -> int:
    """``kvpress longbench [score|plot] ...``."""
    if argv and argv[0] == "score":
        return longbench_score(argv[1:])
    if argv and argv[0] == "plot":
        return longbench_plot(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    return longbench_run(argv)


def describe_policies(registry=None) -> str:
    """Every registered policy with its parameters and defaults (from the dataclass fields)."""
    if registry is None:
        from kvpress.policies import REGISTRY as registry
    lines = []
    for name, cls in sorted(registry.items()):
        fields = [f for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else []
        wraps = any(f.name == "inner" for f in fields)
        doc = (cls.__doc__ or "").strip().split("\n")[0]
        lines.append(f"{name}{'(<policy>)' if wraps else ''}  [{cls.__name__}]  {doc}")
        for f in fields:
            if f.name == "inner":
                continue
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "(required)"
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            lines.append(f"    {f.name}: {kind} = {default}")
    lines.append("full  no eviction")
    return "\n".join(lines)


def policies_main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="kvpress policies", description="List the policies.").parse_args(argv)
    print(describe_policies())
    print("\nSpec syntax: name:key=value,...  wrappers: outer(inner):key=value  options: spec+kvquant:bits=4")
    return 0


def _compress_modes(text: str) -> list[str]:
    """``"question,context"`` -> the modes, each once; an error names the accepted values."""
    from kvpress.longbench.runner import COMPRESS_MODES

    modes = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in modes if m not in COMPRESS_MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"--compress takes {' or '.join(COMPRESS_MODES)} (comma-separated for "
                                         f"both), got {text!r}")
    return modes


def compare_specs(specs: list[str]) -> list[str]:
    """The full cache first (added when missing: it is the fidelity reference), then the others."""
    from kvpress.spec import parse_spec

    parsed = [parse_spec(spec) for spec in specs]  # fails on a bad spec before anything is loaded
    full = [s.text for s in parsed if s.policy is None and not s.options]
    others = [s.text for s in parsed if s.policy is not None or s.options]
    return [full[0] if full else "full", *dict.fromkeys(others)]


def compare_main(argv: list[str]) -> int:
    """Run LongBench once per policy spec (default: full, SnapKV and H2O at 0.5 and 0.2), score each
    compressed run against the full cache's predictions, print and save the comparison."""
    from kvpress.longbench.plot import plot_comparison
    from kvpress.longbench.progress import FileProgress
    from kvpress.longbench.results import (
        ComparedRun,
        comparison_csv,
        comparison_rows,
        comparison_table,
        per_task_table,
    )

    parser = argparse.ArgumentParser(prog="kvpress compare",
                                     description="LongBench for several policies against the full cache.")
    add_run_options(parser, with_policy=False)
    parser.add_argument("--policy", action="append", dest="policies", default=None,
                        help=f"a policy spec; repeat for several (default: {' '.join(COMPARE_POLICIES)}); "
                             "the full cache is always run, as the reference of the fidelity scores")
    parser.add_argument("--compress", type=_compress_modes, default=["question"],
                        help="question (default), context, or question,context for both modes")
    parser.add_argument("--out", default=os.path.join("runs", "compare"), help="parent folder of the runs")
    parser.set_defaults(workers=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    specs = compare_specs(args.policies or list(COMPARE_POLICIES))
    code = _spawned("compare", argv, args.workers)
    if code is not None:
        return code
    wall = time.perf_counter()
    prep = prepare(args)
    plan = [(specs[0], "question")] + [(spec, mode) for mode in args.compress for spec in specs[1:]]
    folders = [os.path.join(args.out, _slug(spec) + ("" if mode == "question" else "-context")) for spec, mode in plan]
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
        return 0
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
          f"answers); written: {out / 'compare.md'}, {out / 'compare.csv'}, {figure}")
    return 0


COMMANDS = {"longbench": longbench_main, "policies": policies_main, "compare": compare_main}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvpress`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"kvpress: unknown command {argv[0]!r}; accepted: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return command(argv[1:])
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"kvpress {argv[0]}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
