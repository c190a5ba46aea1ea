"""The Python side of benchmarks/gpu_check.sh: value checks of the compiled kernels at production
shapes, timing ratios against SDPA in the same run, and an end-to-end decode.

    python benchmarks/kernels_bench.py [--sections values,decode,prefill,e2e,int64] [--results FILE]
                                       [--e2e-layers 32] [--e2e-tokens 64] [--dry-run]

values   every kernel against its PyTorch reference, compiled, at production shapes: decode at batch
         1 with 32k slots and head dim 128 (more than 16 splits), batch 4 with padded rows, GQA group
         7, fp16 with head dim 96, head dim 256 with softcap; prefill through the autotuned path at
         4k tokens and with chunked queries over invalid slots; SnapKV window rows at 8k; compaction
         of 2,048 of 4,096 slots; KIVI quantization bit-exact.
decode   fused decode attention + mass + score fold vs SDPA decode (the G query heads of a KV head
         as G query rows), 8k/32k slots, batch 1 and 8, 32/8 heads, dim 128, bf16; plain launches
         and CUDA graphs. Target <= 1.2x.
prefill  attention + log-sum-exp + mass of every row vs SDPA causal prefill, 8k and 32k tokens.
         Target <= 1.6x (attention at SDPA's speed, the mass pass at issue 3's 0.6x).
e2e      Llama-3-8B shapes with random bf16 weights, 32k-token prompt, greedy decoding:
         PrunedCache(H2O(budget=2048)) vs DynamicCache, ms per new token. Target: faster.
int64    offsets past 2**31 elements (a batch stride of 2**31): decode, prefill, mass, compaction.
         Run last, in its own process: an out-of-bounds access can poison the CUDA context.

Each value check prints `PASS name` or `FAIL name: why`; a section that raises is one FAIL. With
`--results FILE` the lines are also appended there (gpu_check.sh counts them). `--dry-run` runs
every section on CPU in Triton's interpreter with tiny shapes, to test this script without a GPU.
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # before triton is imported: kernels are decorated for the interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import dataclasses
import importlib
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
import triton
import triton.testing

from kvpress.triton_kernels import quantization as kivi
from kvpress.triton_kernels.compaction import compact_slots_reference, compact_slots_triton
from kvpress.triton_kernels.prefill_mass import (
    attention_with_lse_reference,
    attention_with_lse_triton,
    prefill_mass_reference,
    prefill_mass_triton,
)

decode_module = importlib.import_module("kvpress.triton_kernels.decode_attention")

# elementwise tolerance, and `relative`: the bound on ||got - want|| / ||want||, which an output of
# zeros or a mass off by a constant factor cannot meet (long caches make every element small)
OUTPUT_TOLERANCE = {torch.float32: {"atol": 1e-4, "rtol": 1e-4, "relative": 1e-4},
                    torch.float16: {"atol": 3e-3, "rtol": 3e-3, "relative": 3e-3},
                    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2, "relative": 1.5e-2}}
# the mass is fp32 sums of probabilities; bf16/fp16 logits differ from the fp32 reference only by
# the order of the fp32 accumulation
MASS_TOLERANCE = {"atol": 1e-4, "rtol": 1e-3, "relative": 1e-3}
# attention at SDPA's speed plus the mass pass at issue 3's 0.6x of a prefill
PREFILL_TARGET = 1.6


@dataclasses.dataclass
class Scale:
    """Sizes of one run: production on a GPU, tiny in the interpreter (`--dry-run`)."""

    device: torch.device
    long: int  # decode slots at batch 1
    short: int  # decode slots at batch 4
    prefill: int  # tokens of the autotuned prefill check
    window_slots: int  # SnapKV check
    window: int
    chunk: int  # chunked prefill: queries over `prefill` slots
    compact: tuple[int, int]  # kept of slots
    kivi_rows: int
    split_size: int | None  # decode split; None: the default from the SM count
    min_splits: int  # the batch-1 decode must use more splits than this
    heads: tuple[int, int]  # query heads, KV heads
    group7: tuple[int, int]  # heads of the GQA group-7 check
    wide: tuple[int, int]  # heads of the head-dim-256 check
    bench_decode: tuple[int, ...]
    bench_prefill: tuple[int, ...]
    prompt: int
    budget: int
    int64_stride: int  # batch stride of the overflow probe, in elements
    int64_shape: tuple[int, int, int, int]  # KV heads, slots, head dim, queries of the probe
    model: dict


GPU = Scale(torch.device("cuda"), long=32768, short=8192, prefill=4096, window_slots=8192, window=64, chunk=1024,
            compact=(2048, 4096), kivi_rows=8192, split_size=None, min_splits=16, heads=(32, 8),
            group7=(28, 4), wide=(16, 8),
            bench_decode=(8192, 32768), bench_prefill=(8192, 32768), prompt=32768, budget=2048,
            int64_stride=2**31 + 4096, int64_shape=(8, 256, 128, 64),
            model={"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0})
DRY = Scale(torch.device("cpu"), long=300, short=90, prefill=40, window_slots=70, window=5, chunk=16,
            compact=(20, 45), kivi_rows=32, split_size=64, min_splits=4, heads=(4, 2),
            group7=(7, 1), wide=(2, 1),
            bench_decode=(128,), bench_prefill=(32,), prompt=64, budget=40, int64_stride=4096,
            int64_shape=(2, 48, 16, 16),
            model={"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "vocab_size": 101})


class Report:
    """PASS/FAIL lines of the value checks, printed and appended to the results file."""

    def __init__(self, path: str | None):
        self.path = path
        self.failed = 0
        self.timings: list[list] = []  # rows whose last item is "ok", "MISSED" or "-"

    def line(self, text: str) -> None:
        print(text, flush=True)
        if self.path:
            with open(self.path, "a") as file:
                file.write(text + "\n")

    def check(self, name: str, fn) -> None:
        """Run `fn` (which raises AssertionError with the discrepancy, or anything else) as one check."""
        start = time.perf_counter()
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - every failure is reported, then the next check runs
            self.failed += 1
            detail = str(error).strip().splitlines()
            self.line(f"FAIL {name}: {type(error).__name__}: {' | '.join(detail[:6])[:600]}")
            traceback.print_exc(file=sys.stdout)
            return
        self.line(f"PASS {name} ({time.perf_counter() - start:.1f} s)")


def close(got, want, what: str, relative: float | None = None, **tolerance) -> None:
    got, want = got.float(), want.float()
    torch.testing.assert_close(got, want, msg=lambda m: f"{what}: {m}", **tolerance)
    if relative is not None:
        error = float((got - want).norm() / want.norm().clamp_min(1e-30))
        assert error <= relative, f"{what}: relative error {error:.2e} > {relative:.0e}"


def equal(got, want, what: str) -> None:
    if got is None and want is None:
        return
    assert got.dtype == want.dtype and torch.equal(got, want), (
        f"{what}: {(got != want).sum().item()} of {want.numel()} elements differ")


# ---- value checks ----

def attention_inputs(scale: Scale, batch, q_heads, kv_heads, q_len, slots, dim, dtype, keep=0.8):
    device = scale.device
    generator = torch.Generator(device=device).manual_seed(slots * 31 + dim)
    random = lambda *shape: torch.randn(*shape, generator=generator, device=device).to(dtype)
    # transformers passes the query as a transposed view [B, q, Hq, D] -> [B, Hq, q, D]
    query = random(batch, q_len, q_heads, dim).transpose(1, 2)
    key, value = random(batch, kv_heads, slots, dim), random(batch, kv_heads, slots, dim)
    valid = torch.rand(batch, kv_heads, slots, generator=generator, device=device) < keep
    valid[..., slots - q_len:] = True  # a layer's new tokens are valid
    return query, key, value, valid


def check_decode(scale: Scale, batch, q_heads, kv_heads, slots, dim, dtype, softcap=None, min_splits=0):
    query, key, value, valid = attention_inputs(scale, batch, q_heads, kv_heads, 1, slots, dim, dtype)
    query_valid = torch.ones(batch, 1, dtype=torch.bool, device=scale.device)
    if batch > 1:
        query_valid[-1] = False  # a padded row: zero output, no mass
    scores = torch.rand(batch, kv_heads, slots, device=scale.device)
    expected_scores = scores.clone()
    kwargs = {"scaling": dim ** -0.5, "softcap": softcap, "query_valid": query_valid,
              "weights": torch.ones(1, device=scale.device)}
    split = scale.split_size or decode_module.default_split_size(batch * kv_heads, slots, scale.device)
    splits = decode_module.split_count(slots, split)
    assert splits > min_splits, f"{splits} splits, the check needs more than {min_splits}"
    out, folded = decode_module.decode_attention_triton(query, key, value, valid, scores=scores, decay=0.9,
                                                        split_size=scale.split_size, **kwargs)
    ref_out, ref_mass = decode_module.decode_attention_reference(query, key, value, valid, **kwargs)
    close(out, ref_out, f"output ({splits} splits)", **OUTPUT_TOLERANCE[dtype])
    close(folded, expected_scores * 0.9 + ref_mass, "score fold", **MASS_TOLERANCE)
    if batch > 1:
        assert float(out[-1].abs().max()) == 0.0, "a padded query row must output zeros"


def check_prefill(scale: Scale, q_len, slots, dim, dtype, keep, padded):
    q_heads, kv_heads = scale.heads
    query, key, value, valid = attention_inputs(scale, 1, q_heads, kv_heads, q_len, slots, dim, dtype, keep)
    query_valid = None
    if padded:
        query_valid = torch.ones(1, q_len, dtype=torch.bool, device=scale.device)
        query_valid[:, : q_len // 8] = False
    weights = torch.ones(q_len, device=scale.device)
    kwargs = {"scaling": dim ** -0.5, "query_valid": query_valid}
    blocks = None if scale.device.type == "cuda" else (16, 16)  # None: the autotuned kernels
    out, lse = attention_with_lse_triton(query, key, value, valid, blocks=blocks, **kwargs)
    ref_out, ref_lse = attention_with_lse_reference(query, key, value, valid, **kwargs)
    close(out, ref_out, "output", **OUTPUT_TOLERANCE[dtype])
    close(lse, ref_lse, "log-sum-exp", atol=1e-3, rtol=1e-5)
    mass = prefill_mass_triton(query, key, valid, weights=weights, lse=lse, blocks=blocks, **kwargs)
    ref_mass = prefill_mass_reference(query, key, valid, weights=weights, **kwargs)
    close(mass, ref_mass, "mass", **MASS_TOLERANCE)
    rows = q_len - q_len // 8 if padded else q_len
    total = mass.sum(-1) / (q_heads // kv_heads)
    close(total, torch.full_like(total, float(rows)), "mass per query head (one per valid row)", atol=1e-2,
          rtol=1e-4)


def check_window(scale: Scale):
    q_heads, kv_heads = scale.heads
    slots, rows = scale.window_slots, scale.window
    query, key, _, valid = attention_inputs(scale, 1, q_heads, kv_heads, rows, slots, 128, torch.bfloat16)
    weights = torch.ones(rows, device=scale.device)
    blocks = None if scale.device.type == "cuda" else (16, 16)
    mass = prefill_mass_triton(query, key, valid, scaling=128 ** -0.5, weights=weights, blocks=blocks)  # own lse
    ref_mass = prefill_mass_reference(query, key, valid, scaling=128 ** -0.5, weights=weights)
    close(mass, ref_mass, "window mass", **MASS_TOLERANCE)


def check_compaction(scale: Scale):
    kept, slots = scale.compact
    device = scale.device
    keys = torch.randn(2, 8, slots, 128, device=device, dtype=torch.bfloat16)
    values = torch.randn(2, 8, slots, 128, device=device, dtype=torch.bfloat16)
    positions = torch.randint(0, 1 << 20, (2, 8, slots), device=device)
    scores = torch.rand(2, 8, slots, device=device)
    valid = torch.rand(2, 8, slots, device=device) < 0.9
    indices = torch.rand(2, 8, slots, device=device).argsort(-1)[..., :kept].sort(-1).values
    got = compact_slots_triton(keys, values, positions, scores, indices, valid)
    want = compact_slots_reference(keys, values, positions, scores, indices, valid)
    for name, a, b in zip(("keys", "values", "positions", "scores", "valid"), got, want):
        equal(a, b, name)


def check_kivi(scale: Scale):
    device = scale.device
    generator = torch.Generator(device="cpu").manual_seed(7)
    for dtype in (torch.bfloat16, torch.float16):
        x = (torch.randn(scale.kivi_rows, 128, generator=generator) * 3).to(device, dtype)
        x[:, 5] *= 20  # an outlier channel
        for bits in (2, 4, 8):
            for name, a, b in zip(("packed", "scale", "zero"), kivi.quantize_values_triton(x, bits, 32),
                                  kivi.quantize_values_reference(x, bits, 32)):
                equal(a, b, f"values {dtype} {bits}-bit {name}")
            blocks = x.view(-1, 32, 128)
            for name, a, b in zip(("packed", "scale", "zero"), kivi.quantize_keys_triton(blocks, bits),
                                  kivi.quantize_keys_reference(blocks, bits)):
                equal(a, b, f"keys {dtype} {bits}-bit {name}")
            packed, s, z = kivi.quantize_values_reference(x, bits, 32)
            # one rounding to the dtype apart at most (a fused multiply-add rounds once)
            close(kivi.dequantize_values_triton(packed, s, z, bits), kivi.dequantize_values_reference(packed, s, z, bits),
                  f"dequantized values {dtype} {bits}-bit", atol=1e-6, rtol=torch.finfo(dtype).eps)


def values_section(scale: Scale, report: Report) -> None:
    q_heads, kv_heads = scale.heads
    bf16, fp16 = torch.bfloat16, torch.float16
    report.check(f"decode batch 1, {scale.long} slots, dim 128, bf16, more than {scale.min_splits} splits",
                 lambda: check_decode(scale, 1, q_heads, kv_heads, scale.long, 128, bf16, min_splits=scale.min_splits))
    report.check(f"decode batch 4 with a padded row, {scale.short} slots",
                 lambda: check_decode(scale, 4, q_heads, kv_heads, scale.short, 128, bf16))
    report.check(f"decode GQA group 7 ({scale.group7[0]}/{scale.group7[1]} heads)",
                 lambda: check_decode(scale, 2, *scale.group7, scale.short, 128, bf16))
    report.check("decode fp16, head dim 96", lambda: check_decode(scale, 2, q_heads, kv_heads, scale.short, 96, fp16))
    report.check("decode head dim 256, softcap 50",
                 lambda: check_decode(scale, 1, *scale.wide, scale.short, 256, bf16, softcap=50.0))
    report.check(f"prefill {scale.prefill} tokens, attention + lse + mass (autotuned tiles on a GPU)",
                 lambda: check_prefill(scale, scale.prefill, scale.prefill, 128, bf16, keep=1.0, padded=False))
    report.check(f"prefill chunk of {scale.chunk} queries over {scale.prefill} slots, 30% invalid, padded rows",
                 lambda: check_prefill(scale, scale.chunk, scale.prefill, 128, bf16, keep=0.7, padded=True))
    report.check(f"SnapKV window of {scale.window} rows over {scale.window_slots} slots",
                 lambda: check_window(scale))
    report.check(f"compaction of {scale.compact[0]} of {scale.compact[1]} slots", lambda: check_compaction(scale))
    report.check("KIVI quantize bit-exact (2/4/8 bits, bf16/fp16)", lambda: check_kivi(scale))


def int64_section(scale: Scale, report: Report) -> None:
    """Tensors whose batch 1 starts `int64_stride` elements in: every offset past 2**31 on a GPU."""
    device, stride = scale.device, scale.int64_stride
    kv_heads, slots, dim, q_len = scale.int64_shape
    per_batch = kv_heads * slots * dim
    storage = torch.zeros(stride + 2 * per_batch, device=device, dtype=torch.bfloat16)
    storage[stride:] = torch.randn(2 * per_batch, device=device, dtype=torch.bfloat16)
    shape, strides = (2, kv_heads, slots, dim), (stride, slots * dim, dim, 1)
    key = storage.as_strided(shape, strides)
    value = storage.as_strided(shape, strides, per_batch)  # batch 1 right after key's
    query = torch.randn(2, 4 * kv_heads, q_len, dim, device=device, dtype=torch.bfloat16)
    valid = torch.ones(2, kv_heads, slots, dtype=torch.bool, device=device)
    far = lambda t: t[1:].contiguous()  # batch 1, copied next to the start: the reference
    blocks = None if device.type == "cuda" else (16, 16)

    def decode():
        out, mass = decode_module.decode_attention_triton(query[:, :, -1:], key, value, valid, scaling=0.1,
                                                          weights=torch.ones(1, device=device))
        ref_out, ref_mass = decode_module.decode_attention_reference(far(query[:, :, -1:]), far(key), far(value),
                                                                     far(valid), scaling=0.1,
                                                                     weights=torch.ones(1, device=device))
        close(out[1:], ref_out, "decode output", **OUTPUT_TOLERANCE[torch.bfloat16])
        close(mass[1:], ref_mass, "decode mass", **MASS_TOLERANCE)

    def prefill():
        out, lse = attention_with_lse_triton(query, key, value, valid, scaling=0.1, blocks=blocks)
        ref_out, _ = attention_with_lse_reference(far(query), far(key), far(value), far(valid), scaling=0.1)
        close(out[1:], ref_out, "prefill output", **OUTPUT_TOLERANCE[torch.bfloat16])
        mass = prefill_mass_triton(query, key, valid, scaling=0.1, weights=torch.ones(q_len, device=device),
                                   lse=lse, blocks=blocks)
        ref_mass = prefill_mass_reference(far(query), far(key), far(valid), scaling=0.1,
                                          weights=torch.ones(q_len, device=device))
        close(mass[1:], ref_mass, "prefill mass", **MASS_TOLERANCE)

    def compaction():
        positions = torch.arange(slots, device=device).expand(2, kv_heads, slots)
        scores = torch.rand(2, kv_heads, slots, device=device)
        indices = torch.arange(0, slots, 2, device=device).expand(2, kv_heads, slots // 2)
        got = compact_slots_triton(key, value, positions, scores, indices)
        equal(got[0][1:], far(key)[:, :, ::2], "kept keys of batch 1")
        equal(got[1][1:], far(value)[:, :, ::2], "kept values of batch 1")

    offset = f"batch stride {stride} elements"
    report.check(f"int64 offsets: decode, {offset}", decode)
    report.check(f"int64 offsets: prefill attention + mass, {offset}", prefill)
    report.check(f"int64 offsets: compaction, {offset}", compaction)


# ---- timings ----

def milliseconds(fn, graph: bool = False) -> float:
    """Median ms: Triton's do_bench (or do_bench_cudagraph) on a GPU; a few plain runs on CPU.
    `fn` has run once before (compilation and autotuning stay outside the timing)."""
    if torch.cuda.is_available():
        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    runs = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1000)
    return min(runs)


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in row) + " |")
    sys.stdout.flush()


def sdpa_gqa(query, key, value, causal):
    """SDPA over grouped heads: `enable_gqa` where torch has it (>= 2.5), else repeated KV heads."""
    try:
        return F.scaled_dot_product_attention(query, key, value, is_causal=causal, enable_gqa=True)
    except TypeError:
        group = query.shape[1] // key.shape[1]
        return F.scaled_dot_product_attention(query, key.repeat_interleave(group, 1),
                                              value.repeat_interleave(group, 1), is_causal=causal)


def ratio_rows(name, fused, baseline, target, on_gpu: bool):
    """Timings of two callables (each warmed up here), plainly and under CUDA graphs; targets are
    judged on a GPU only."""
    fused()
    baseline()
    rows = []
    for graph in ((False, True) if on_gpu else (False,)):
        t_fused, t_base = milliseconds(fused, graph), milliseconds(baseline, graph)
        verdict = ("ok" if t_fused <= target * t_base else "MISSED") if on_gpu else "- (dry run)"
        rows.append([*name, "graph" if graph else "plain", t_base, t_fused, t_fused / t_base, verdict])
    return rows


def decode_rows(scale: Scale, batch: int, slots: int) -> list[list]:
    q_heads, kv_heads = scale.heads
    query, key, value, valid = attention_inputs(scale, batch, q_heads, kv_heads, 1, slots, 128, torch.bfloat16,
                                                keep=0.95)
    weights = torch.ones(1, device=scale.device)
    scores = torch.zeros(batch, kv_heads, slots, device=scale.device)
    q_sdpa = query.reshape(batch, kv_heads, q_heads // kv_heads, 128)  # G query rows per KV head

    def fused():
        decode_module.decode_attention_triton(query, key, value, valid, scaling=128 ** -0.5, weights=weights,
                                              scores=scores, split_size=scale.split_size)

    def baseline():
        F.scaled_dot_product_attention(q_sdpa, key, value, scale=128 ** -0.5)

    return ratio_rows((batch, slots), fused, baseline, 1.2, scale.device.type == "cuda")


def decode_section(scale: Scale, report: Report) -> None:
    batches = (1, 8) if scale.device.type == "cuda" else (1,)
    rows = [row for batch in batches for slots in scale.bench_decode for row in decode_rows(scale, batch, slots)]
    table("Decode: fused attention + mass + score fold vs SDPA decode (ms, bf16, 32/8 heads, dim 128)",
          ["batch", "slots", "launch", "SDPA", "fused", "fused / SDPA", "target <= 1.2x"], rows)
    report.timings += rows


def prefill_rows(scale: Scale, n: int) -> list[list]:
    q_heads, kv_heads = scale.heads
    blocks = None if scale.device.type == "cuda" else (16, 16)
    query, key, value, valid = attention_inputs(scale, 1, q_heads, kv_heads, n, n, 128, torch.bfloat16, keep=1.0)
    query = query.contiguous()
    weights = torch.ones(n, device=scale.device)

    def ours():
        _, lse = attention_with_lse_triton(query, key, value, valid, scaling=128 ** -0.5, blocks=blocks)
        prefill_mass_triton(query, key, valid, scaling=128 ** -0.5, weights=weights, lse=lse, blocks=blocks)

    def baseline():
        sdpa_gqa(query, key, value, causal=True)

    return ratio_rows((n,), ours, baseline, PREFILL_TARGET, scale.device.type == "cuda")


def prefill_section(scale: Scale, report: Report) -> None:
    rows = [row for n in scale.bench_prefill for row in prefill_rows(scale, n)]
    table("Prefill: attention + lse + mass of every row vs SDPA causal prefill (ms, batch 1, bf16)",
          ["tokens", "launch", "SDPA", "ours", "ours / SDPA", f"target <= {PREFILL_TARGET}x"], rows)
    report.timings += rows


def e2e_section(scale: Scale, report: Report, layers: int, new_tokens: int) -> None:
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from kvpress import PrunedCache
    from kvpress.policies import H2O

    device = scale.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**scale.model, num_hidden_layers=layers, max_position_embeddings=2 * scale.prompt + 1024,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random init straight in bf16
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    ids = torch.randint(0, config.vocab_size, (1, scale.prompt), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(make_cache, count):
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
                           do_sample=False, past_key_values=make_cache(), pad_token_id=0)
        sync()
        return time.perf_counter() - start

    makers = [("DynamicCache", DynamicCache),
              (f"PrunedCache(H2O(budget={scale.budget}))", lambda: PrunedCache(H2O(budget=scale.budget))),
              (f"PrunedCache(H2O(budget={scale.budget}), slack=64)",
               lambda: PrunedCache(H2O(budget=scale.budget), slack=64))]
    rows = []
    for name, make in makers:
        run(make, 1 + new_tokens)  # warm-up at full length: every compile, autotune and compaction
        t_one = run(make, 1)
        t_many = run(make, 1 + new_tokens)
        rows.append([name, t_one * 1000, (t_many - t_one) / new_tokens * 1000])
    base = rows[0][2]
    judge = lambda row: ("ok" if row[2] < base else "MISSED") if device.type == "cuda" else "- (dry run)"
    rows = [row + [row[2] / base, "-" if i == 0 else judge(row)] for i, row in enumerate(rows)]
    table(f"End to end: Llama-3-8B shapes, {layers} layers, random {str(dtype)[6:]} weights, {scale.prompt}-token "
          f"prompt, batch 1, {new_tokens} greedy tokens (CUDA graphs: not applicable, both caches change "
          f"shape every step)",
          ["cache", "prefill + 1 token (ms)", "ms per new token", "vs DynamicCache", "target: faster"], rows)
    report.timings += [[row[0], "plain", *row[1:]] for row in rows[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="values,decode,prefill,e2e")
    parser.add_argument("--results", help="append PASS/FAIL and timing-target lines to this file")
    parser.add_argument("--e2e-layers", type=int, default=32)
    parser.add_argument("--e2e-tokens", type=int, default=64)
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    args = parser.parse_args()
    # transformers 5.24 prefers `cache=`; `past_key_values=` works on 5.17 too
    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("kernels_bench.py needs a CUDA GPU (or --dry-run)")
    scale = DRY if args.dry_run else GPU
    torch.manual_seed(0)
    device = "CPU, Triton interpreter (dry run)" if args.dry_run else torch.cuda.get_device_name()
    print(f"device: {device} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    report = Report(args.results)
    sections = {"values": lambda: values_section(scale, report), "int64": lambda: int64_section(scale, report),
                "decode": lambda: decode_section(scale, report), "prefill": lambda: prefill_section(scale, report),
                "e2e": lambda: e2e_section(scale, report, args.e2e_layers if not args.dry_run else 2,
                                           args.e2e_tokens if not args.dry_run else 4)}
    for name in args.sections.split(","):
        if name not in sections:
            sys.exit(f"unknown section {name!r}; sections: {', '.join(sections)}")
        start = time.perf_counter()
        print(f"\n## {name}", flush=True)
        if name in ("values", "int64"):
            sections[name]()
        else:
            report.check(f"{name} timings ran", sections[name])
        if scale.device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"({name} took {time.perf_counter() - start:.0f} s)", flush=True)
    for row in report.timings:
        report.line(f"TARGET {row[-1].split()[0]} {' / '.join(str(x) for x in row[:-4])}")
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
