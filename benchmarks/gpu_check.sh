#!/usr/bin/env bash
# On a CUDA machine: run the kernel tests on the GPU (compiled, no interpreter), then print the
# benchmark ratios of issue 3 (benchmarks/kernels_bench.py). Budget: under 8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# Needs python3 with torch (CUDA), triton and pytest. kvpress needs transformers >= 5.24: if the
# python has an older one, the script installs wheels found in .whl/ (no network needed; see
# docs/kernels.md), else tries PyPI (pip, 120 s limit), else skips the end-to-end benchmark.
# kvpress itself is put on the path as a copy laid out like the installed package, so nothing is
# built or installed into the system python.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${KVPRESS_GPU_CHECK_DIR:-/tmp/kvpress-gpu-check}"
PYTHON="${PYTHON:-python3}"
TEST_LIMIT="${TEST_LIMIT:-200}"     # seconds
BENCH_LIMIT="${BENCH_LIMIT:-270}"   # seconds
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
unset TRITON_INTERPRET
START=$SECONDS

section() { printf '\n==== %s (t=%ss) ====\n' "$1" "$((SECONDS - START))"; }

section "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi unavailable"
"$PYTHON" - <<'PY'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda available:", torch.cuda.is_available())
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton MISSING")
try:
    import transformers; print("transformers", transformers.__version__)
except ImportError:
    print("transformers MISSING")
try:
    import flash_attn; print("flash-attn", flash_attn.__version__)
except ImportError:
    print("flash-attn not installed: SDPA baselines")
if not torch.cuda.is_available():
    sys.exit("no CUDA device: this script is for a GPU machine (CPU tests: pytest tests/kernels)")
PY

section "python path: kvpress copy and missing packages"
rm -rf "$WORK" && mkdir -p "$WORK/shim/kvpress" "$WORK/site"
cp -r "$REPO/kvpress/." "$WORK/shim/kvpress/"
cp -r "$REPO/triton_kernels" "$WORK/shim/kvpress/triton_kernels"
cp -r "$REPO/policies" "$WORK/shim/kvpress/policies"
cp -r "$REPO/longbench" "$WORK/shim/kvpress/longbench"
export PYTHONPATH="$WORK/shim:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"

transformers_ok() {
    "$PYTHON" -c "import transformers, sys; v = tuple(int(x) for x in transformers.__version__.split('.')[:2]); sys.exit(0 if v >= (5, 24) else 1)" 2>/dev/null
}
if ! transformers_ok; then
    if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
        echo "installing carried wheels: $(ls "$REPO"/.whl)"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$REPO"/.whl/*.whl
    else
        echo "transformers < 5.24 and no .whl/: trying PyPI (120 s limit)"
        timeout 120 "$PYTHON" -m pip install -q --no-deps --target "$WORK/site" "transformers>=5.24,<6" \
            || echo "pip install failed (no network?)"
    fi
fi
E2E=1
if ! transformers_ok; then
    echo "WARNING: transformers >= 5.24 unavailable: the end-to-end benchmark and the generate test are skipped"
    E2E=0
fi
(cd "$WORK" && "$PYTHON" -c "import kvpress.triton_kernels as k, transformers; print('kvpress from', k.__file__, '| transformers', transformers.__version__)") \
    || { echo "FAILED to import kvpress"; exit 1; }

section "kernel tests on the GPU (limit ${TEST_LIMIT}s)"
TEST_STATUS=0
(cd "$WORK" && timeout "$TEST_LIMIT" "$PYTHON" -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
    "$REPO/tests/kernels" -rs --durations=5) || TEST_STATUS=$?
echo "kernel tests exit status: $TEST_STATUS (0 = all passed, 124 = time limit)"

section "benchmarks (limit ${BENCH_LIMIT}s)"
SECTIONS="decode,prefill"
[ "$E2E" = 1 ] && SECTIONS="$SECTIONS,e2e"
BENCH_STATUS=0
(cd "$WORK" && timeout "$BENCH_LIMIT" "$PYTHON" "$REPO/benchmarks/kernels_bench.py" --sections "$SECTIONS" \
    --e2e-layers "${E2E_LAYERS:-4}" --e2e-tokens "${E2E_TOKENS:-64}") || BENCH_STATUS=$?
echo "benchmark exit status: $BENCH_STATUS (124 = time limit)"

section "done"
echo "kernel tests: $TEST_STATUS, benchmarks: $BENCH_STATUS, total ${SECONDS}s"
[ "$TEST_STATUS" = 0 ] && [ "$BENCH_STATUS" = 0 ]
