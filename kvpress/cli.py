"""The ``kvpress`` command.

::

    kvpress longbench [--model M] [--policy SPEC] [--tasks T,...] [--max-length N] [--out DIR] ...
    kvpress longbench score DIR
    kvpress longbench plot DIR [DIR ...] [--out FOLDER]
    kvpress policies
    kvpress compare [--policy SPEC ...] [--out DIR]

``torchrun --nproc-per-node N -m kvpress.longbench ...`` runs the first form sharded over N processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from pathlib import Path

DEFAULT_SAMPLE_MAX_LENGTH = 7500
COMPARE_POLICIES = ("full", "snapkv:budget=0.5", "snapkv:budget=0.2", "h2o:budget=0.5", "h2o:budget=0.2")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "-", spec).strip("-") or "run"


def add_run_options(parser: argparse.ArgumentParser, with_policy: bool = True) -> None:
    """Options shared by ``kvpress longbench`` and ``kvpress compare``."""
    from kvpress.longbench.data import SOURCES
    from kvpress.longbench.prompts import CHAT_TEMPLATE_MODES, V2_TEMPLATES

    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a HF path/id")
    if with_policy:
        parser.add_argument("--policy", default="full", help="policy spec, e.g. 'snapkv:budget=1024,window=32'")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated tasks (v1 names, <task>_e, v2) or groups all, en16, zh, e; "
                             "default: every task of the bundled sample, or 'all' with other data")
    parser.add_argument("--max-length", type=int, default=None,
                        help="middle-truncate prompts to this many tokens (required with real data; "
                             f"{DEFAULT_SAMPLE_MAX_LENGTH} for the bundled sample)")
    parser.add_argument("--chat-template", default="official", choices=CHAT_TEMPLATE_MODES)
    parser.add_argument("--data", default="auto", choices=SOURCES,
                        help="auto: --data-dir if given, else the hub if reachable, else the bundled sample")
    parser.add_argument("--data-dir", default=None, help="folder of official <config>.jsonl files")
    parser.add_argument("--limit", type=int, default=None, help="first N samples of each task")
    parser.add_argument("--min-new-tokens-all", action="store_true",
                        help="forbid EOS as first token on every task (SnapKV/PyramidKV protocol)")
    parser.add_argument("--v2-template", default="0shot", choices=[t for t in V2_TEMPLATES
                                                                   if t not in ("0shot_cot_ans", "0shot_rag")])
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--device", default="auto", help="auto: cuda:LOCAL_RANK if available, else cpu")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--workers", type=int, default=1,
                        help="local processes sharing the samples (like torchrun --nproc-per-node)")


def _device(name: str, local_rank: int) -> str:
    import torch

    if name != "auto":
        return name
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def _dtype(name: str, device: str) -> str:
    return ("float32" if device == "cpu" else "bfloat16") if name == "auto" else name


@dataclasses.dataclass
class Prepared:
    """Everything a run needs besides the policy: data, tasks, model, tokenizer, shard."""

    source: object
    configs: list
    model: object
    tokenizer: object
    shard: object
    max_length: int | None
    dtype: str


def prepare(args) -> Prepared:
    """Resolve the data source and tasks, join the process group, load the model."""
    import torch

    from kvpress.longbench.data import resolve_source, sample_tasks
    from kvpress.longbench.distributed import Shard
    from kvpress.longbench.tasks import parse_task_list
    from kvpress.models import load_model

    source = resolve_source(args.data, args.data_dir)
    if args.data == "auto" and source.kind == "sample" and args.data_dir is None:
        print("kvpress: using the bundled LongBench sample (no --data-dir, hub not reachable or not asked)",
              file=sys.stderr)
    tasks = args.tasks or (",".join(sample_tasks()) if source.kind == "sample" else "all")
    configs = parse_task_list(tasks)
    max_length = args.max_length
    if max_length is None:
        if source.kind != "sample":
            raise ValueError("--max-length is required with real data (e.g. 3500 for 4k-context models, "
                             "7500 for 8k, 31500 for 32k: the official head-room of 500 tokens)")
        max_length = DEFAULT_SAMPLE_MAX_LENGTH
    shard = Shard.from_env()
    device = _device(args.device, shard.local_rank)
    dtype = _dtype(args.dtype, device)
    model, tokenizer = load_model(args.model, dtype=getattr(torch, dtype),
                                  attn_implementation=args.attn_implementation, device=device)
    return Prepared(source, configs, model, tokenizer, shard, max_length, dtype)


def run_one(args, prep: Prepared, spec_text: str, out_dir: str, quiet: bool = False) -> dict | None:
    """Run one policy spec into ``out_dir``; on rank 0 score it, write the reports, return the result."""
    from kvpress.longbench import runner
    from kvpress.longbench.report import score_run, v2_table, write_reports
    from kvpress.spec import build_cache, parse_spec

    spec = parse_spec(spec_text)
    settings = runner.RunSettings(
        model=args.model, policy=spec.text, policy_resolved=spec.canonical(),
        tasks=[c.name for c in prep.configs], max_length=prep.max_length, chat_template=args.chat_template,
        data=prep.source.describe(), limit=args.limit, min_new_tokens_all=args.min_new_tokens_all,
        v2_template=args.v2_template, dtype=prep.dtype, attn_implementation=args.attn_implementation,
    )
    extra = {"policy_name": spec.name, "budget": spec.budget,
             "selection": "per KV head" if spec.policy is not None else None,
             "decode_time_eviction": None if spec.policy is None else spec.policy.evicts_during("decode")}
    config = prep.model.config
    start = time.perf_counter()
    complete = runner.run(settings, prep.configs, prep.source, prep.model, prep.tokenizer,
                          lambda: build_cache(spec, config), out_dir, prep.shard,
                          progress=not args.no_progress, header_extra=extra)
    if not prep.shard.is_main:
        return None
    result = score_run(out_dir)
    table = write_reports(out_dir, result)
    if not quiet:
        print(f"\n{spec.text}  ({out_dir}, {time.perf_counter() - start:.1f} s)")
        print(table)
        extra_table = v2_table(result)
        if extra_table:
            print("\nLongBench v2 accuracy\n" + extra_table)
        if not complete:
            print("warning: some samples have no prediction yet", file=sys.stderr)
    return result


def _spawned(command: str, argv: list[str], workers: int) -> int | None:
    """Re-launch this command in ``workers`` local processes unless already inside a sharded run."""
    if workers <= 1 or "WORLD_SIZE" in os.environ:
        return None
    from kvpress.longbench.distributed import spawn_local

    return spawn_local([command, *argv], workers)


def longbench_run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kvpress longbench", description="Run LongBench with a cache policy.",
        epilog="Also: 'kvpress longbench score DIR...', 'kvpress longbench plot DIR... [--out FOLDER]'. "
               "Sharded: torchrun --nproc-per-node N -m kvpress.longbench [options] (or --workers N).")
    add_run_options(parser)
    parser.add_argument("--out", default=None, help="run folder (default runs/<policy>)")
    args = parser.parse_args(argv)
    from kvpress.spec import parse_spec

    parse_spec(args.policy)  # fail on a bad spec before loading anything
    code = _spawned("longbench", argv, args.workers)
    if code is not None:
        return code
    prep = prepare(args)
    try:
        run_one(args, prep, args.policy, args.out or os.path.join("runs", _slug(args.policy)))
    finally:
        prep.shard.close()
    return 0


def longbench_score(argv: list[str]) -> int:
    from kvpress.longbench.report import score_run, v2_table, write_reports

    parser = argparse.ArgumentParser(prog="kvpress longbench score", description="Score a run folder.")
    parser.add_argument("dirs", nargs="+", help="run folder(s)")
    args = parser.parse_args(argv)
    for folder in args.dirs:
        result = score_run(folder)
        print(f"{folder}  ({result['run']['config']['policy']})")
        print(write_reports(folder, result))
        extra = v2_table(result)
        if extra:
            print("\nLongBench v2 accuracy\n" + extra)
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


def compare_main(argv: list[str]) -> int:
    """Run LongBench once per policy spec (default: full, SnapKV and H2O at 0.5 and 0.2) and print the
    comparison table."""
    from kvpress.longbench.report import comparison_table

    parser = argparse.ArgumentParser(prog="kvpress compare",
                                     description="LongBench for several policies, one comparison table.")
    add_run_options(parser, with_policy=False)
    parser.add_argument("--policy", action="append", dest="policies", default=None,
                        help=f"a policy spec; repeat for several (default: {' '.join(COMPARE_POLICIES)})")
    parser.add_argument("--out", default=os.path.join("runs", "compare"), help="parent folder of the runs")
    parser.set_defaults(workers=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    from kvpress.spec import parse_spec

    specs = args.policies or list(COMPARE_POLICIES)
    for spec in specs:  # fail on a bad spec before loading anything
        parse_spec(spec)
    code = _spawned("compare", argv, args.workers)
    if code is not None:
        return code
    prep = prepare(args)
    start = time.perf_counter()
    results = {}
    try:
        for spec in specs:
            result = run_one(args, prep, spec, os.path.join(args.out, _slug(spec)), quiet=True)
            if result is not None:
                results[spec] = result
                print(f"{spec}: done ({time.perf_counter() - start:.0f} s elapsed)", file=sys.stderr)
    finally:
        prep.shard.close()
    if results:
        table = comparison_table(results)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "compare.md").write_text(table + "\n", encoding="utf-8")
        print(f"\nLongBench ({prep.source.describe()} data, model {args.model}, "
              f"{time.perf_counter() - start:.0f} s)")
        print(table)
    return 0


COMMANDS = {"longbench": longbench_main, "policies": policies_main, "compare": compare_main}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvpress`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
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
