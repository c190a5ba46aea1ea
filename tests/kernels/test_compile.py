"""The kernels compile for sm_80 (A100) and sm_90 (H100/H200) without a GPU, within each target's
shared memory, and without register spills in the bf16/fp16 paths.

tests/kernels/compile_kernels.py compiles, in a separate process (the interpreter must be off), the
variants that the real launchers produce; this test reads its records. The interpreter upcasts
bf16/fp16, tolerates out-of-bounds reads and never compiles: this is the only check of the
compiled code a CI machine can make.

Covering set. The full product (3 dtypes x 4 head dims x 4 groups x softcap x every autotune
configuration x 2 targets, about 800 compilations of 1-10 s each) does not fit this suite's
two minutes on a 2-core machine, so the cases (`compile_kernels.cases`, 72 compilations) take, for
each kernel, the constexprs that change the generated code, each at least once per target:

- Head dim sets the tile widths (`BLOCK_D` = 64, 128, 128, 256 for 64, 96, 128, 256: 96 adds
  masked columns) and dtype the operand type; every head dim and every dtype is compiled for the
  decode, attention and mass kernels, head dim 256 (the largest tiles) in bf16.
- Autotune: every configuration that fits the target (`prefill_mass.fitting_configs`, which the
  launcher applies at run time too) at bf16, head dim 128, the production case; elsewhere the
  fitting configuration of most shared memory, the nearest to the limits.
- GQA group: in decode it only masks rows of a 16-row tile (`BLOCK_G` is 16 for groups up to 16)
  and sets the merge tile; in prefill it is a loop bound. Groups 1, 4, 7 and 8 are all compiled.
- Softcap on and off, output-only and mass-only decode, the log-sum-exp-only prefill, decode merge
  tiles of 16, 32 and 64 splits, compaction of bf16 and fp32 rows, the KIVI kernels (4-bit, and
  2-bit quantize in fp16).

Triton's on-disk cache keeps compiled kernels (and this script keeps their ptxas logs beside
them), so a second run on the same machine takes seconds.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("compile_kernels.py")
HALF = ("bf16", "fp16")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "records.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    workers = min(2, os.cpu_count() or 1)
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "80,90", "--workers", str(workers),
                             "--json", str(out)], env=env, check=False, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    if "skip" in data:
        pytest.skip(data["skip"])
    print(result.stdout)
    return data["records"]


def describe(record) -> str:
    return (f"sm_{record['arch']} {record['kernel']} [{record['case']}] warps {record['num_warps']} "
            f"stages {record['num_stages']} {record['constexprs']}")


def test_every_variant_compiles_for_sm80_and_sm90(records):
    errors = [f"{describe(r)}: {r['error'][:500]}" for r in records if "error" in r]
    assert not errors, "\n".join(errors)


def test_shared_memory_fits_the_target(records):
    over = [f"{describe(r)}: {r['shared']} B > {r['shared_limit']} B" for r in records
            if "error" not in r and r["shared"] > r["shared_limit"]]
    assert not over, "\n".join(over)


def test_no_register_spills_in_half_precision_paths(records):
    spills = [f"{describe(r)}: {r['spill_stores']} B stored, {r['spill_loads']} B loaded, {r['registers']} regs"
              for r in records if "error" not in r and r["dtype"] in HALF and (r["spill_stores"] or r["spill_loads"])]
    assert not spills, "\n".join(spills)


def test_the_cases_cover_every_kernel_fitting_config_dtype_head_dim_and_group(records):
    limits = {r["arch"]: r["shared_limit"] for r in records}
    # the package re-exports a function named like this module: reach the module itself
    prefill_mass = importlib.import_module("kvpress.triton_kernels.prefill_mass")

    compiled = {(r["arch"], r["kernel"]) for r in records}
    kernels = {"_decode_split_kernel", "_decode_combine_kernel", "_attention_lse_kernel", "_prefill_mass_kernel",
               "_compact_kernel", "_quantize_values_kernel", "_quantize_keys_kernel", "_dequantize_kernel",
               "_quantized_decode_kernel"}
    assert compiled == {(arch, kernel) for arch in (80, 90) for kernel in kernels}
    for kernel, kind, configs in (("_attention_lse_kernel", "attention", prefill_mass.ATTENTION_CONFIGS),
                                  ("_prefill_mass_kernel", "mass", prefill_mass.MASS_CONFIGS)):
        for arch in (80, 90):
            seen = {(r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_N"], r["num_warps"], r["num_stages"])
                    for r in records if r["kernel"] == kernel and r["arch"] == arch
                    and r["constexprs"]["HEAD_DIM"] == 128 and r["dtype"] == "bf16"}
            fitting = prefill_mass.fitting_configs(configs, kind, 2, 128, 128, limits[arch])
            assert len(fitting) >= 3 and seen == {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                                   c.num_stages) for c in fitting}
    for kernel in ("_decode_split_kernel", "_attention_lse_kernel", "_prefill_mass_kernel"):
        kernel_records = [r for r in records if r["kernel"] == kernel]
        assert {r["dtype"] for r in kernel_records} == {"bf16", "fp16", "fp32"}
        assert {r["constexprs"]["HEAD_DIM"] for r in kernel_records} == {64, 96, 128, 256}
        assert {r["constexprs"]["GROUP"] for r in kernel_records} == {1, 4, 7, 8}
    assert {r["constexprs"]["BLOCK_SPLITS"] for r in records if r["kernel"] == "_decode_combine_kernel"} == {16, 32, 64}
