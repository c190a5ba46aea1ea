"""Compile the Triton kernels for NVIDIA GPUs without a GPU, and read what `ptxas` says of them.

    python tests/kernels/compile_kernels.py [--arch 80,90] [--workers 2] [--json out.json]

Each case calls a real launcher (`decode_attention_triton`, `attention_with_lse_triton`, ...) on
`meta` tensors (shapes and strides, no memory) with its kernels replaced by recorders, so the
compiled argument lists, constexprs and specialisations are the ones the dispatch launches:
integer arguments equal to 1 become constants and multiples of 16 are marked divisible by 16, as
Triton's launcher does; tensors are taken as 16-byte aligned (torch allocations are). An
autotuned kernel is compiled once per configuration. Each variant goes through
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` down to PTX and cubin, the
cubin assembled by the `ptxas` shipped in the triton wheel, whose `-v` log gives registers, spills
and static shared memory (Triton's own dynamic shared memory is in the compiled metadata).

Prints one line per variant and, with `--json`, writes the records for tests/kernels/test_compile.py.
Run it as a script, in its own process: `TRITON_INTERPRET` must be off before triton is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints its ptxas -v log when it assembles a kernel
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

import torch

# opt-in shared memory per block: A100 163 KiB, H100/H200 227 KiB (CUDA programming guide, table 21)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
META = torch.device("meta")


@dataclasses.dataclass
class Launch:
    kernel: object  # a JITFunction or a triton Autotuner
    args: tuple
    kwargs: dict
    configs: list | None = None  # of an Autotuner: the configurations to compile


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, args, kwargs))


@contextlib.contextmanager
def recording(module, names: tuple[str, ...], launches: list):
    saved = {name: getattr(module, name) for name in names}
    for name, kernel in saved.items():
        setattr(module, name, _Recorder(kernel, launches))
    try:
        yield
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)


def _module(name: str):
    # the package re-exports functions named like their modules: reach the modules themselves
    return importlib.import_module(f"kvpress.triton_kernels.{name}")


# ---- the cases: which launcher calls produce the variants ----

def _attention_operands(dtype, dim, group, q_len, slots, kv_heads=8, batch=1):
    q_heads = kv_heads * group
    # transformers hands the query over as a transposed view of [B, q, Hq, D]
    query = torch.empty(batch, q_len, q_heads, dim, device=META, dtype=dtype).transpose(1, 2)
    key = torch.empty(batch, kv_heads, slots, dim, device=META, dtype=dtype)
    value = torch.empty_like(key)
    valid = torch.empty(batch, kv_heads, slots, device=META, dtype=torch.bool)
    return query, key, value, valid


def decode_launches(dtype, dim, group, softcap=True, want_output=True, want_mass=True, splits=40):
    """Both decode kernels, with padded rows and the score fold; `splits` one-tile splits (the
    merge tile rounds it up to a power of two, at least 16)."""
    decode = _module("decode_attention")
    slots = splits * decode.BLOCK_N
    query, key, value, valid = _attention_operands(dtype, dim, group, 1, slots)
    launches = []
    with recording(decode, ("_decode_split_kernel", "_decode_combine_kernel"), launches):
        decode.decode_attention_triton(
            query, key, value, valid, scaling=dim ** -0.5, softcap=30.0 if softcap else None,
            query_valid=torch.empty(1, 1, device=META, dtype=torch.bool),
            weights=torch.empty(1, device=META) if want_mass else None,
            scores=torch.empty(1, 8, slots, device=META) if want_mass else None,
            want_output=want_output, split_size=decode.BLOCK_N)
    return launches


def prefill_launches(dtype, dim, group, softcap=True, want_output=True, every_config=False):
    """The autotuned attention + log-sum-exp kernel and the mass kernel on chunked-prefill shapes.
    Compiled: every configuration that fits the target (`every_config`), or the one of most shared
    memory among them, the nearest to the limits."""
    prefill = _module("prefill_mass")
    query, key, value, valid = _attention_operands(dtype, dim, group, 1024, 4096)
    query_valid = torch.empty(1, 1024, device=META, dtype=torch.bool)
    launches = []
    kwargs = {"scaling": dim ** -0.5, "softcap": 30.0 if softcap else None, "query_valid": query_valid}
    with recording(prefill, ("_attention_lse_tuned", "_prefill_mass_tuned"), launches):
        _, lse = prefill.attention_with_lse_triton(query, key, value, valid, want_output=want_output, **kwargs)
        prefill.prefill_mass_triton(query, key, valid, weights=torch.empty(1024, device=META), lse=lse, **kwargs)
    for launch, kind in zip(launches, ("attention", "mass")):
        sizes = (kind, dtype.itemsize, launch.kwargs["BLOCK_D"], launch.kwargs.get("BLOCK_DV", launch.kwargs["BLOCK_D"]))
        fitting = prefill.fitting_configs(launch.kernel.configs, *sizes, LIMIT[0])
        launch.configs = fitting if every_config else [max(fitting, key=lambda c: prefill.config_footprint(c, *sizes))]
    return launches


def compaction_launches(dtype, dim):
    compaction = _module("compaction")
    keys = torch.empty(1, 8, 4096, dim, device=META, dtype=dtype)
    positions = torch.empty(1, 8, 4096, device=META, dtype=torch.long)
    scores = torch.empty(1, 8, 4096, device=META)
    indices = torch.empty(1, 8, 2048, device=META, dtype=torch.long)
    valid = torch.empty(1, 8, 4096, device=META, dtype=torch.bool)
    launches = []
    saved = compaction.check_indices
    compaction.check_indices = lambda keys, indices: None  # reads index values, which meta tensors lack
    try:
        with recording(compaction, ("_compact_kernel",), launches):
            compaction.compact_slots_triton(keys, keys, positions, scores, indices, valid)
    finally:
        compaction.check_indices = saved
    return launches


def quantization_launches(dtype, bits, dim=128, group=32, block=32, decode=True):
    quantization = _module("quantization")
    names = ("_quantize_values_kernel", "_quantize_keys_kernel", "_dequantize_kernel", "_quantized_decode_kernel")
    rows = 4096
    x = torch.empty(rows, dim, device=META, dtype=dtype)
    launches = []
    with recording(quantization, names, launches):
        quantization.quantize_values_triton(x, bits, group)
        quantization.quantize_keys_triton(x.view(rows // block, block, dim), bits)
        if not decode:
            return launches
        packed = torch.empty(rows, dim * bits // 8, device=META, dtype=torch.uint8)
        scale = torch.empty(rows, dim // group, device=META, dtype=dtype)
        key_scale = torch.empty(rows // block, dim, device=META, dtype=dtype)
        quantization.dequantize_values_triton(packed, scale, scale, bits)
        quantization.dequantize_keys_triton(packed, key_scale, key_scale,
                                            torch.empty(rows, device=META, dtype=torch.long), bits)
        b, h, n, r = 1, 8, 512, 64
        codes = torch.empty(b, h, n, dim * bits // 8, device=META, dtype=torch.uint8)
        params = lambda last: torch.empty(b, h, n // block if last == dim else n, last, device=META, dtype=dtype)
        quantization.quantized_decode_attention_triton(
            torch.empty(b, 32, dim, device=META, dtype=dtype), codes, params(dim), params(dim),
            torch.empty(b, h, n, device=META, dtype=torch.long), codes, params(dim // group), params(dim // group),
            torch.empty(b, h, r, dim, device=META, dtype=dtype), torch.empty(b, h, r, dim, device=META, dtype=dtype),
            torch.empty(b, h, n + r, device=META, dtype=torch.bool), scaling=dim ** -0.5, bits=bits,
            return_logits=True)  # the cache's decoding step stores logits for the mass
    return launches


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
LIMIT = [0]  # shared memory of the target being captured


def cases(arch: int) -> list[tuple[str, list[Launch]]]:
    """The covering set for one target; tests/kernels/test_compile.py says why it covers what the
    dispatch launches. The launchers see the target's shared memory (decode pipelining depth,
    autotune pruning)."""
    LIMIT[0] = SHARED_LIMIT[arch]
    decode, prefill = _module("decode_attention"), _module("prefill_mass")
    saved = decode.shared_memory_limit
    decode.shared_memory_limit = lambda device: LIMIT[0]
    out = []
    add = lambda name, launches: out.append((name, launches))
    try:
        # decode: dtype x head dim where the tiles change; groups 1, 4, 7, 8 and the flags spread over them
        for dtype, dim, group, flags in (
                (BF16, 64, 1, {}), (BF16, 128, 4, {"splits": 1}), (BF16, 256, 8, {}),
                (FP16, 96, 7, {"splits": 20, "want_mass": False, "softcap": False}),
                (FP32, 128, 4, {"want_output": False})):
            add(f"decode {_short(dtype)} D{dim} G{group} {flags or ''}".strip(),
                decode_launches(dtype, dim, group, **flags))
        # prefill: every fitting configuration at bf16 D128, the one nearest the limits elsewhere
        add("prefill bf16 D128 G4", prefill_launches(BF16, 128, 4, every_config=True))
        for dtype, dim, group, flags in (
                (BF16, 64, 1, {}), (BF16, 256, 8, {}), (FP16, 96, 7, {"softcap": False}),
                (FP32, 128, 4, {"want_output": False})):
            add(f"prefill {_short(dtype)} D{dim} G{group} {flags or ''}".strip(),
                prefill_launches(dtype, dim, group, **flags))
        for dtype, dim in ((BF16, 96), (FP32, 256)):
            add(f"compaction {_short(dtype)} D{dim}", compaction_launches(dtype, dim))
        add("kivi bf16 4-bit", quantization_launches(BF16, 4))
        add("kivi fp16 2-bit quantize", quantization_launches(FP16, 2, decode=False))
    finally:
        decode.shared_memory_limit = saved
    del prefill
    return out


def _short(dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


# ---- from recorded launches to compiled variants ----

def variants(launches: list[Launch]) -> list[tuple[object, tuple, dict, dict]]:
    """`(jit_function, args, constexpr kwargs, compile options)` per variant: an autotuned launch
    gives one per configuration."""
    out = []
    for launch in launches:
        options = {k: v for k, v in launch.kwargs.items() if k in ("num_warps", "num_stages", "enable_fp_fusion")}
        kwargs = {k: v for k, v in launch.kwargs.items() if k not in options}
        configs = launch.configs if launch.configs is not None else getattr(launch.kernel, "configs", None)
        if configs is None:
            out.append((launch.kernel, launch.args, kwargs, {"num_warps": 4, "num_stages": 3, **options}))
            continue
        for config in configs:
            out.append((launch.kernel.fn, launch.args, {**kwargs, **config.kwargs},
                        {**options, "num_warps": config.num_warps, "num_stages": config.num_stages}))
    return out


def source(fn, args: tuple, kwargs: dict):
    """The `ASTSource` Triton's launcher would build for these arguments."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    bound = dict(zip(fn.arg_names, args)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        value = bound[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        specialize = not param.do_not_specialize
        kind = mangle_type(value, specialize)
        if kind == "constexpr":  # an integer equal to 1
            signature[name], constexprs[name] = "constexpr", value
            continue
        signature[name] = kind
        integer = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(value, torch.Tensor) or (specialize and integer and value % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs, attrs)


PTXAS_PATTERNS = {
    "registers": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack": r"(\d+) bytes stack frame",
    "static_shared": r"(\d+) bytes smem",
}


def parse_ptxas(log: str) -> dict:
    return {key: int(m.group(1)) if (m := re.search(pattern, log)) else 0 for key, pattern in PTXAS_PATTERNS.items()}


def ptxas_log(compiled, arch: int, options: dict, printed: str) -> str:
    """The `ptxas -v` log of Triton's own assembly of this kernel (`TRITON_DUMP_PTXAS_LOG=1` prints it
    during `triton.compile`). A kernel Triton found in its cache was not assembled again: its log
    comes from the copy kept beside that cache, or from running the same ptxas command again."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    kept = os.path.join(triton.knobs.cache.dir, "kvpress-ptxas-logs", f"{compiled.hash}-{arch}.log")
    if "Used " in printed:
        os.makedirs(os.path.dirname(kept), exist_ok=True)
        with open(kept, "w") as file:
            file.write(printed)
        return printed
    if os.path.exists(kept):
        with open(kept) as file:
            return file.read()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as file:
            file.write(compiled.asm["ptx"])
        fmad = [] if options.get("enable_fp_fusion", True) else ["--fmad=false"]
        result = subprocess.run([get_ptxas(arch).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
                                 f"--gpu-name={sm_arch_from_capability(arch)}", path, "-o", path + ".o"],
                                capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"ptxas failed:\n{result.stderr}")
    return result.stderr


def compile_variant(job: tuple) -> dict:
    """One variant for one architecture: a record with the ptxas figures, or the compile error."""
    case, arch, fn, args, kwargs, options = job
    import triton
    from triton.backends.compiler import GPUTarget

    shown = {k: v for k, v in kwargs.items() if k.startswith(("BLOCK_", "HAS_", "WANT_", "GROUP", "HEAD", "BITS"))}
    record = {"case": case, "arch": arch, "kernel": fn.__name__, "constexprs": shown,
              "num_warps": options["num_warps"], "num_stages": options["num_stages"],
              "shared_limit": SHARED_LIMIT[arch], "dtype": case.split()[1]}
    start = time.perf_counter()
    try:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            compiled = triton.compile(source(fn, args, kwargs), target=GPUTarget("cuda", arch, 32), options=options)
        record.update(parse_ptxas(ptxas_log(compiled, arch, options, printed.getvalue())))
        record["shared"] = compiled.metadata.shared + record["static_shared"]
        record["cubin_bytes"] = len(compiled.asm["cubin"])
    except Exception as error:  # noqa: BLE001 - reported per variant, the test fails on it
        record["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def jobs(archs: list[int]) -> list[tuple]:
    """One job per distinct (kernel source and specialisation, options, architecture)."""
    out, seen = [], set()
    for arch in archs:
        for case, launches in cases(arch):
            for fn, args, kwargs, options in variants(launches):
                key = (arch, source(fn, args, kwargs).hash(), tuple(sorted(options.items())))
                if key not in seen:
                    seen.add(key)
                    out.append((case, arch, fn, args, kwargs, options))
    return out


def _compile_share(share: list[int], archs: list[int]) -> list[dict]:
    everything = jobs(archs)
    return [compile_variant(everything[i]) for i in share]


def run(archs: list[int], workers: int) -> list[dict]:
    from kvpress.triton_kernels import HAS_TRITON

    if not HAS_TRITON:
        raise SystemExit("triton is not installed")
    count = len(jobs(archs))
    if workers <= 1:
        return _compile_share(list(range(count)), archs)
    # workers rebuild the job list themselves (meta tensors and kernels do not pickle)
    shares = [list(range(i, count, workers)) for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        parts = pool.map(_compile_share, shares, [archs] * workers)
        return sorted((r for part in parts for r in part), key=lambda r: (r["case"], r["kernel"], r["arch"]))


def has_nvidia_backend() -> str | None:
    """`None` when the installed triton can compile for NVIDIA GPUs, else why not."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as error:
        return f"the installed triton has no NVIDIA backend ({error})"
    path = get_ptxas(90).path
    if not os.path.exists(path):
        return f"the installed triton's NVIDIA backend has no ptxas at {path}"
    return None


def main() -> None:
    # before anything imports triton (kvpress.triton_kernels does, in `cases`)
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints its ptxas -v log when it assembles a kernel
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args()
    reason = has_nvidia_backend()
    if reason:
        print(f"SKIP: {reason}")
        if args.json:
            with open(args.json, "w") as file:
                json.dump({"skip": reason}, file)
        return
    start = time.perf_counter()
    records = run([int(a) for a in args.arch.split(",")], args.workers)
    for r in records:
        figures = (f"{r['registers']:3d} regs, spills {r['spill_stores']}/{r['spill_loads']} B, "
                   f"shared {r['shared']} B" if "error" not in r else f"ERROR {r['error'][:200]}")
        print(f"sm_{r['arch']} {r['kernel']:26s} {r['case']:34s} w{r['num_warps']} s{r['num_stages']} "
              f"{r['constexprs'].get('BLOCK_M', '')}x{r['constexprs'].get('BLOCK_N', '')}: {figures} ({r['seconds']} s)")
    print(f"{len(records)} variants compiled in {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"records": records}, file)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
