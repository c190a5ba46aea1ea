#!/usr/bin/env bash
# Builds the offline wheel folder benchmarks/gpu_check.sh installs on the GPU machine, which reaches
# no package registry:
#
#   bash benchmarks/build_gpu_wheels.sh [FOLDER]     # default FOLDER: .whl/ at the repository root
#
# What goes in, and why nothing else (the GPU machine's image, read 2026-11: Python 3.12, torch
# 2.11, triton 3.6, huggingface-hub 1.33, tokenizers 0.23.2, safetensors 0.8.0, transformers 5.17,
# plus accelerate, numpy, regex, pyyaml, typer, tqdm, pytest, pytest-xdist):
# - kvprune's own wheel, built from this working tree (uncommitted edits included: the check
#   compares the installed sources with the tree and refuses a stale wheel);
# - transformers 5.24.0, pinned: kvprune needs >= 5.24, and 5.25 needs a newer huggingface-hub than
#   that machine's 1.33 (5.24.0 takes huggingface-hub >= 1.31, < 3; its other requirements are the
#   same as those of the 5.17 already there).
# gguf, rouge, fuzzywuzzy and jieba (kvprune's dependencies for the embedded model and the LongBench
# metrics) are not there and are left out: the check never imports them (its environment section
# fails if kvpress starts to). Everything is installed there with --no-deps, so no resolver runs.
#
# Last, the folder is installed offline (--no-index) into a scratch target and imported from there,
# so a wheel that does not install or import fails here, not on a GPU loan.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FOLDER="$(realpath -m "${1:-$REPO/.whl}")"
PYTHON="${PYTHON:-python3}"
PINS=(transformers==5.24.0)
# the GPU machine's interpreter: CPython 3.12 on x86-64 Linux (only pure-Python wheels are pinned,
# the tags keep pip from picking a wheel built for this machine instead)
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

rm -rf "$FOLDER"
mkdir -p "$FOLDER"
echo "building kvprune from $REPO"
if "$PYTHON" -c "import setuptools, wheel" 2>/dev/null; then
    "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$FOLDER" "$REPO"
else  # pip fetches setuptools into an isolated build environment
    "$PYTHON" -m pip wheel -q --no-deps -w "$FOLDER" "$REPO"
fi
echo "downloading ${PINS[*]}"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$FOLDER" "${PINS[@]}"

echo "checking that the folder installs offline and imports"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --find-links "$FOLDER" --target "$SCRATCH" \
    kvprune "${PINS[@]}"
(cd "$SCRATCH" && PYTHONPATH="$SCRATCH" "$PYTHON" - "$SCRATCH" "${PINS[@]}" <<'PY'
import importlib.metadata
import pathlib
import sys

target = pathlib.Path(sys.argv[1])
import kvpress
import transformers

for module in (kvpress, transformers):
    assert pathlib.Path(module.__file__).is_relative_to(target), f"{module.__name__} imported from {module.__file__}"
for pin in sys.argv[2:]:
    name, version = pin.split("==")
    assert importlib.metadata.version(name) == version, (name, importlib.metadata.version(name), version)
print(f"offline install ok: kvprune {importlib.metadata.version('kvprune')}, transformers {transformers.__version__}")
PY
)
ls -l "$FOLDER"
echo "$(du -sh "$FOLDER" | cut -f1) in $FOLDER (the device tool carries at most 64 MiB with the working tree)"
