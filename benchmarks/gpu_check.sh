#!/usr/bin/env bash
# The GPU verdict in one command: the kernels compiled on a CUDA GPU, checked against their PyTorch
# references at production shapes, timed against SDPA, and an end-to-end decode.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --dry-run   # on CPU: every section, Triton's interpreter, tiny shapes
#
# Installs nothing from the network: only the wheels in .whl/ at the repository root (git-ignored;
# docs/kernels.md says how to fill it: kvprune's own wheel and a transformers >= 5.24 wheel), into
# a private folder on PYTHONPATH. Without a kvprune wheel, kvpress is a copy of this working tree
# laid out like the installed package. Sections: environment and install, kernel tests compiled,
# value checks then timings (decode, prefill, end to end), int64 probe (in its own process: an
# out-of-bounds access can poison the CUDA context), LazyLLM time to first token, summary. Every check prints PASS or FAIL; the last line is
# `N passed, N failed`, and the exit status is 1 when a check failed. Timing targets are reported
# (ok / MISSED) but do not fail the run. Budget: under 10 minutes on one H200 (the time limits below
# add up to 9.5).
set -uo pipefail

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${KVPRESS_GPU_CHECK_DIR:-$(mktemp -d /tmp/kvpress-gpu-check.XXXXXX)}"
PYTHON="${PYTHON:-python3}"
RESULTS="$WORK/results.txt"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1
    TESTS_LIMIT=60 CHECKS_LIMIT=120 PROBE_LIMIT=60 TTFT_LIMIT=0
else
    unset TRITON_INTERPRET
    TESTS_LIMIT=90 CHECKS_LIMIT=300 PROBE_LIMIT=60 TTFT_LIMIT=120  # seconds
fi
START=$SECONDS
mkdir -p "$WORK" && : > "$RESULTS"
cd "$WORK" || exit 2  # not the repository: kvpress must come from the install

section() { printf '\n==== %s (t=%ss) ====\n' "$1" "$((SECONDS - START))"; }
record() { echo "$1" | tee -a "$RESULTS"; }
fails() { grep -c '^FAIL' "$RESULTS"; }

# run NAME LIMIT COMMAND...: a step whose own checks write PASS/FAIL lines; a crash, a time limit
# or a non-zero exit that wrote no FAIL line becomes one FAIL line
run() {
    local name=$1 limit=$2 before status
    shift 2
    before=$(fails)
    timeout "$limit" "$@"
    status=$?
    if [ "$status" = 124 ]; then
        record "FAIL $name: time limit (${limit} s)"
    elif [ "$status" != 0 ] && [ "$(fails)" = "$before" ]; then
        record "FAIL $name: exit status $status"
    fi
}

section "environment and install (carried wheels only, no network)"
if [ "$DRY" = 1 ]; then
    echo "dry run: CPU, Triton's interpreter, tiny shapes; timings are not judged; nothing installed"
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi unavailable"
    echo "wheels carried in .whl/: $(ls "$REPO/.whl" 2>/dev/null | tr '\n' ' ')"
    mkdir -p "$WORK/site"
    if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
            "$REPO"/.whl/*.whl || record "FAIL install of the wheels in .whl/"
    fi
    if ! compgen -G "$REPO/.whl/kvprune-*.whl" > /dev/null; then
        echo "no kvprune wheel in .whl/: kvpress is a copy of the working tree"
        mkdir -p "$WORK/site/kvpress"
        cp -r "$REPO/kvpress/." "$WORK/site/kvpress/"
        for package in triton_kernels policies longbench; do cp -r "$REPO/$package" "$WORK/site/kvpress/$package"; done
    fi
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" - "$REPO" "$DRY" <<'PY'
import importlib
import pathlib
import sys

import torch

repo, dry = pathlib.Path(sys.argv[1]), sys.argv[2] == "1"
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA available:", torch.cuda.is_available())
if not dry and not torch.cuda.is_available():
    print("no CUDA device: this check is for a GPU machine (on CPU: bash benchmarks/gpu_check.sh --dry-run)")
    sys.exit(2)
versions = {}
for name in ("triton", "transformers", "flash_attn", "kvpress"):
    try:
        module = importlib.import_module(name)
        versions[name] = getattr(module, "__version__", "") + f" ({pathlib.Path(module.__file__).parent})"
    except ImportError as error:
        versions[name] = f"not importable: {error}"
print("ran with: " + " | ".join(f"{name} {version}" for name, version in versions.items()))
import transformers

if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 24):
    sys.exit(f"transformers {transformers.__version__} < 5.24: carry a transformers wheel (docs/kernels.md)")
stale = []
for folder, package in (("kvpress", "kvpress"), ("triton_kernels", "kvpress.triton_kernels"),
                        ("policies", "kvpress.policies"), ("longbench", "kvpress.longbench")):
    installed = pathlib.Path(importlib.import_module(package).__file__).parent
    for source in (repo / folder).glob("*.py"):
        copy = installed / source.name
        if not copy.is_file() or copy.read_bytes() != source.read_bytes():
            stale.append(f"{folder}/{source.name}")
if stale:
    sys.exit(f"the installed kvpress differs from this working tree in {stale[:5]}: rebuild the wheel "
             f"(docs/kernels.md) or leave it out of .whl/")
PY
status=$?
[ "$status" = 2 ] && exit 2
[ "$status" != 0 ] && record "FAIL kvpress importable, from this working tree, with transformers >= 5.24"

section "kernel tests, compiled (limit ${TESTS_LIMIT} s)"
if [ "$DRY" = 1 ]; then  # the suite itself runs this dry run: one test shows the step works
    TESTS=("$REPO/tests/kernels/test_compaction.py::test_compaction_of_strided_storage_without_valid")
else  # the compile test runs in CI; the dry-run test is for machines without a GPU
    TESTS=("$REPO/tests/kernels" --ignore="$REPO/tests/kernels/test_compile.py"
           --ignore="$REPO/tests/kernels/test_gpu_check.py")
    # compiling the tests' kernel variants dominates: spread it over processes where xdist is installed
    "$PYTHON" -c "import xdist" 2>/dev/null && TESTS+=(-n 8)
fi
timeout "$TESTS_LIMIT" "$PYTHON" -m pytest -q -p no:cacheprovider --rootdir "$REPO" -rs --durations=3 \
    "${TESTS[@]}" 2>&1 | tee "$WORK/pytest.log"
status=${PIPESTATUS[0]}
summary=$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$WORK/pytest.log" | tail -1)
if [ "$status" = 0 ]; then record "PASS kernel tests, compiled: $summary"
elif [ "$status" = 124 ]; then record "FAIL kernel tests, compiled: time limit (${TESTS_LIMIT} s)"
else record "FAIL kernel tests, compiled: $summary (exit status $status)"; fi

BENCH=("$PYTHON" "$REPO/benchmarks/kernels_bench.py" --results "$RESULTS")
[ "$DRY" = 1 ] && BENCH+=(--dry-run)

section "value checks at production shapes, then timings: decode, prefill, end to end (limit ${CHECKS_LIMIT} s)"
run "value checks and timings" "$CHECKS_LIMIT" "${BENCH[@]}" --sections values,decode,prefill,e2e \
    --e2e-layers "${E2E_LAYERS:-32}" --e2e-tokens "${E2E_TOKENS:-64}"

section "int64 offsets past 2**31 elements (limit ${PROBE_LIMIT} s)"
run "int64 probe" "$PROBE_LIMIT" "${BENCH[@]}" --sections int64

section "LazyLLM time to first token, random-weight Llama-3-8B shape (limit ${TTFT_LIMIT} s)"
if [ "$DRY" = 1 ]; then  # an 8B-shaped model does not fit a CPU dry run; tests/test_lazyllm.py covers the CPU path
    echo "dry run: skipped (the same script runs on CPU as: python benchmarks/ttft.py)"
else
    run "LazyLLM time to first token" "$TTFT_LIMIT" "$PYTHON" "$REPO/benchmarks/ttft.py" --llama3-8b \
        --device cuda --lengths 2048,8192 --new-tokens 16 --results "$RESULTS"
fi

section "summary (total ${SECONDS} s)"
grep '^FAIL' "$RESULTS" || true
met=$(grep -c '^TARGET ok' "$RESULTS")
missed=$(grep -c '^TARGET MISSED' "$RESULTS")
grep '^TARGET MISSED' "$RESULTS" || true
[ "$DRY" = 0 ] && echo "timing targets: $met met, $missed missed (reported, not failed)"
passed=$(grep -c '^PASS' "$RESULTS")
failed=$(fails)
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
