"""benchmarks/gpu_check.sh tested without a GPU: `--dry-run` runs every section end to end (CPU,
Triton's interpreter, tiny shapes) and writes its three files into the folder it is given, and a
broken python turns every step into a FAIL and the exit status into 1."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
SECTIONS = ("environment and install", "kernel tests, compiled", "value checks at production shapes",
            "timings: decode, prefill, quantized decode", "end to end: 32k-token generation", "compiled decoding",
            "int64 offsets", "LazyLLM time to first token", "summary")


def run_check(folder, python, *args):
    env = {**os.environ, "PYTHON": python, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), str(folder), *args], env=env, check=False, capture_output=True,
                          text=True, timeout=600)


def test_dry_run_runs_every_section_and_every_check_passes(tmp_path):
    result = run_check(tmp_path / "out", sys.executable, "--dry-run")
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-2000:]
    for section in SECTIONS:
        assert f"==== {section}" in out, section
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["log.txt", "results.txt", "verdict.txt"]
    results = (tmp_path / "out" / "results.txt").read_text().splitlines()
    passed = [line for line in results if line.startswith("PASS")]
    # environment, kernel tests, 12 value checks, 3 timing sections, e2e (comparison + section),
    # 11 int64 probes, LazyLLM; 4 timing rows; the compiled section is not built yet
    assert len(passed) == 31 and not [line for line in results if line.startswith("FAIL")], results
    assert sum(line.startswith("PASS int64 offsets") for line in passed) == 11
    assert any(line.startswith("PASS end to end") and "PyTorch path" in line for line in passed)
    assert sum(line.startswith("TARGET") for line in results) == 5  # 4 kernel rows, LazyLLM's "-"
    assert [line.split(":")[0] for line in results if line.startswith("NOT BUILT")] == ["NOT BUILT compiled decoding"]
    verdict = (tmp_path / "out" / "verdict.txt").read_text().splitlines()
    assert len(verdict) == 1 and verdict[0].startswith("PASS: 31 passed, 0 failed; not built yet: compiled decoding")
    assert out == (tmp_path / "out" / "log.txt").read_text()
    assert out.strip().splitlines()[-1] == "31 passed, 0 failed"


def test_a_broken_python_fails_every_step_and_the_exit_status(tmp_path):
    result = run_check(tmp_path, "false", "--dry-run")
    assert result.returncode == 1
    last = result.stdout.strip().splitlines()[-1]
    # kvpress not importable, kernel tests, value checks, timings, end to end, int64 probe, LazyLLM
    assert re.fullmatch(r"0 passed, 7 failed", last), result.stdout[-3000:]
    assert (tmp_path / "verdict.txt").read_text().startswith("FAIL: 0 passed, 7 failed")


def test_the_output_folder_is_required():
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], check=False, capture_output=True, text=True)
    assert result.returncode == 2 and "usage: bash benchmarks/gpu_check.sh OUT_DIR" in result.stderr
