"""The ``kvpress`` command (usage: :data:`USAGE`, printed by ``kvpress --help``): it reads the command
name and dispatches. The LongBench commands (``longbench``, ``compare``) parse their options and run in
``kvpress.longbench.command``; ``policies`` lists the policy registry."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from kvpress.longbench.command import compare_main, longbench_main

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
