"""benchmarks/gpu_check.sh tested without a GPU: `--dry-run` runs every section end to end (CPU,
Triton's interpreter, tiny shapes), and a broken python turns every step into a FAIL and the exit
status into 1."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
SECTIONS = ("environment and install", "kernel tests, compiled",
            "value checks at production shapes, then timings: decode, prefill, end to end", "int64 offsets",
            "summary")


def run_check(tmp_path, python, *args):
    env = {**os.environ, "PYTHON": python, "KVPRESS_GPU_CHECK_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, check=False, capture_output=True, text=True, timeout=240)


def test_dry_run_runs_every_section_and_every_check_passes(tmp_path):
    result = run_check(tmp_path, sys.executable, "--dry-run")
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-2000:]
    for section in SECTIONS:
        assert f"==== {section}" in out, section
    results = (tmp_path / "results.txt").read_text().splitlines()
    passed = [line for line in results if line.startswith("PASS")]
    # 1 kernel-test step, 10 value checks, 3 timing sections, 3 int64 probes; 4 timing rows
    assert len(passed) == 17 and not [line for line in results if line.startswith("FAIL")], results
    assert sum(line.startswith("PASS int64 offsets") for line in passed) == 3
    assert sum(line.startswith("TARGET") for line in results) == 4
    assert out.strip().splitlines()[-1] == "17 passed, 0 failed"


def test_a_broken_python_fails_every_step_and_the_exit_status(tmp_path):
    result = run_check(tmp_path, "false", "--dry-run")
    assert result.returncode == 1
    last = result.stdout.strip().splitlines()[-1]
    # kvpress not importable, kernel tests, value checks and timings, int64 probe
    assert re.fullmatch(r"0 passed, 4 failed", last), result.stdout[-3000:]
