"""The harness's command lines, ``longbench [run|score|plot]`` and ``compare``: their options, parsing,
the relaunch in ``--workers`` local processes, and the call into ``evaluate`` or ``compare``.

``kvpress longbench`` and ``kvpress compare`` (``kvpress.cli``) dispatch here, and so do
``python -m kvpress.longbench`` and the worker processes (``python -m kvpress.longbench.command``)."""

from __future__ import annotations

import argparse
import os
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16")
ERRORS = (ValueError, FileNotFoundError, RuntimeError)  # reported in one line, exit code 2


def positive(name: str):
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


def compress_modes(text: str) -> list[str]:
    """``"question,context"`` -> the modes, each once; an error names the accepted values."""
    from kvpress.longbench.runner import COMPRESS_MODES

    modes = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in modes if m not in COMPRESS_MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"--compress takes {' or '.join(COMPRESS_MODES)} (comma-separated for "
                                         f"both), got {text!r}")
    return modes


def add_run_options(parser: argparse.ArgumentParser, with_policy: bool = True) -> None:
    """Options shared by ``kvpress longbench`` and ``kvpress compare``."""
    from kvpress.longbench.data import SOURCES
    from kvpress.longbench.prepare import DEFAULT_SAMPLE_MAX_LENGTH
    from kvpress.longbench.prompts import CHAT_TEMPLATE_MODES, V2_TEMPLATES
    from kvpress.longbench.runner import V2_MAX_LENGTH

    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a HF path/id")
    if with_policy:
        parser.add_argument("--policy", default="full", help="policy spec, e.g. 'snapkv:budget=1024,window=32'")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated tasks (v1 names, <task>_e, v2) or groups all, en16, zh, e; "
                             "default: every task of the bundled sample, or 'all' with other data")
    parser.add_argument("--max-length", type=positive("--max-length"), default=None,
                        help="middle-truncate v1/LongBench-E prompts to this many tokens (default: the "
                             "model's value in model2maxlen.json; required with real data for other models; "
                             f"{DEFAULT_SAMPLE_MAX_LENGTH} for the bundled sample)")
    parser.add_argument("--v2-max-length", type=positive("--v2-max-length"), default=V2_MAX_LENGTH,
                        help=f"middle-truncate LongBench v2 prompts to this many tokens (default {V2_MAX_LENGTH}, "
                             "the official value; never taken from --max-length)")
    parser.add_argument("--chat-template", default="official", choices=CHAT_TEMPLATE_MODES)
    parser.add_argument("--data", default="auto", choices=SOURCES,
                        help="auto: --data-dir if given, else the bundled sample (the network is never "
                             "consulted); hub: download the official files")
    parser.add_argument("--data-dir", default=None, help="folder of official <config>.jsonl files")
    parser.add_argument("--limit", type=positive("--limit"), default=None, help="first N samples of each task")
    parser.add_argument("--min-new-tokens-all", action="store_true",
                        help="forbid EOS as first token on every task (SnapKV/PyramidKV protocol)")
    parser.add_argument("--v2-template", default="0shot", choices=[t for t in V2_TEMPLATES
                                                                   if t not in ("0shot_cot_ans", "0shot_rag")])
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--after-prompt", default="evict", choices=("evict", "append"),
                        help="evict: the cache keeps evicting while decoding (default); append: the prompt is "
                             "compressed once and every generated token is appended (PrunedCache(after_prompt=))")
    parser.add_argument("--device", default="auto", help="auto: cuda:LOCAL_RANK if available, else cpu")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--workers", type=positive("--workers"), default=1,
                        help="local processes sharing the samples (like torchrun --nproc-per-node)")


def _spawned(command: str, argv: list[str], workers: int) -> int | None:
    """Re-launch this command in ``workers`` local processes unless already inside a sharded run."""
    if workers <= 1 or "WORLD_SIZE" in os.environ:
        return None
    from kvpress.longbench.distributed import spawn_local

    return spawn_local("kvpress.longbench.command", [command, *argv], workers)


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
    from kvpress.longbench.evaluate import run_policy
    from kvpress.spec import parse_spec

    parse_spec(args.policy)  # fail on a bad spec before loading anything
    code = _spawned("longbench", argv, args.workers)
    if code is not None:
        return code
    run_policy(args)
    return 0


def longbench_score(argv: list[str]) -> int:
    from kvpress.longbench.evaluate import score_folders

    parser = argparse.ArgumentParser(prog="kvpress longbench score", description="Score a run folder.")
    parser.add_argument("dirs", nargs="+", help="run folder(s)")
    parser.add_argument("--reference", default=None,
                        help="full-cache run folder of the same data and protocol: adds the fidelity columns")
    args = parser.parse_args(argv)
    score_folders(args.dirs, reference=args.reference)
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


def compare_main(argv: list[str]) -> int:
    """``kvpress compare``: LongBench once per policy spec (default: full, SnapKV and H2O at 0.5 and
    0.2), each compressed run scored against the full cache's predictions (``longbench.compare``)."""
    from kvpress.longbench.compare import COMPARE_POLICIES, compare, compare_specs

    parser = argparse.ArgumentParser(prog="kvpress compare",
                                     description="LongBench for several policies against the full cache.")
    add_run_options(parser, with_policy=False)
    parser.add_argument("--policy", action="append", dest="policies", default=None,
                        help=f"a policy spec; repeat for several (default: {' '.join(COMPARE_POLICIES)}); "
                             "the full cache is always run, as the reference of the fidelity scores")
    parser.add_argument("--compress", type=compress_modes, default=["question"],
                        help="question (default), context, or question,context for both modes")
    parser.add_argument("--out", default=os.path.join("runs", "compare"), help="parent folder of the runs")
    parser.set_defaults(workers=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    specs = compare_specs(args.policies or list(COMPARE_POLICIES))
    code = _spawned("compare", argv, args.workers)
    if code is not None:
        return code
    compare(args, specs)
    return 0


COMMANDS = {"longbench": longbench_main, "compare": compare_main}


def main(argv: list[str]) -> int:
    """``COMMAND [options]`` for a command of :data:`COMMANDS`, an error of :data:`ERRORS` printed as
    ``kvpress COMMAND: error: ...`` with exit code 2 (what the ``kvpress`` command does)."""
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ERRORS as err:
        print(f"kvpress {argv[0]}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
