"""The Python side of benchmarks/gpu_check.sh: value checks of the compiled kernels at production
shapes, timing ratios against SDPA in the same run, an end-to-end 32k-token generation compared
with the PyTorch path, and the int64 probe.

    python benchmarks/kernels_bench.py [--sections values,decode,prefill,quantized,e2e,int64]
                                       [--results FILE] [--e2e-layers 32] [--e2e-tokens 32] [--dry-run]

values     every kernel against its PyTorch reference, compiled, at production shapes: decode at batch
           1 with 32k slots and head dim 128 (more than 16 splits), batch 4 with padded rows, GQA
           group 7, fp16 with head dim 96, head dim 256 with softcap; prefill attention + lse + mass
           through the autotuned path at 4k and 32k tokens and with chunked queries over invalid
           slots; SnapKV window rows at 8k; compaction of 2,048 of 4,096 slots (bit-exact); KIVI
           quantization bit-exact; the quantized (KIVI 4-bit) decode kernel at Llama-3-8B's shape.
decode     fused decode attention + mass + score fold vs SDPA decode (the G query heads of a KV head
           as G query rows), 8k/32k slots, batch 1 and 8, 32/8 heads, dim 128, bf16; plain launches
           and CUDA graphs. Target <= 1.2x.
prefill    attention + log-sum-exp + mass of every row vs SDPA causal prefill, 8k and 32k tokens.
           Target <= 1.6x (attention at SDPA's speed, the mass pass at issue 3's 0.6x).
quantized  the KIVI 4-bit decode kernel (attention + logits for the mass) vs its PyTorch reference
           (dequantize, then attention) and vs SDPA over the same slots in bf16, Llama-3-8B heads,
           8k/32k slots. Reported, no target.
e2e        Llama-3-8B shapes with random bf16 weights, a 32k-token prompt, greedy decoding:
           PrunedCache(H2O(budget=2048)) (also with slack=64) vs DynamicCache, median ms per new
           token (target: faster); and the same H2O generation with KVPRESS_TRITON=0 (the PyTorch
           path) fed the kernel path's tokens, compared logits and tokens step by step.
int64      offsets past 2**31 elements reached with strides below 2**31 (strided views of one
           storage, and tensors of more than 2**31 elements): decode, prefill attention + mass,
           compaction, quantized decode. Run last, in its own process: an out-of-bounds access can
           poison the CUDA context.

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
import functools
import importlib
import statistics
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
class Quantized:
    """A KIVI-quantized layer for the quantized decode kernel: `slots` quantized slots plus
    `residual` full-precision ones, `bits`, groups of `group` (KVQuant's defaults: 4, 32, 128)."""

    slots: int
    residual: int = 128
    bits: int = 4
    group: int = 32
    dim: int = 128


@dataclasses.dataclass
class Probe:
    """Sizes of the int64 probe. `far`: the element offset every probed tensor reaches (2**31 on a
    GPU); strides stay below it. `slots`, `queries`: the strided views' cache and prefill lengths;
    `blocks`: the prefill tiles (fixed: no autotuning on these shapes);
    `split`: the decode split of the slot-strided view (its last split starts past `far`);
    `rows_queries`: prefill length of the tensors of more than `far` elements (batch from `far`);
    `quant_slots`: quantized slots per KV head of the quantized-decode probe."""

    far: int
    slots: int
    queries: int
    split: int
    rows_queries: int
    quant_slots: int
    blocks: tuple[int, int]


@dataclasses.dataclass
class Scale:
    """Sizes of one run: production on a GPU, tiny in the interpreter (`--dry-run`)."""

    device: torch.device
    long: int  # decode slots at batch 1
    short: int  # decode slots at batch 4
    prefill: int  # tokens of the autotuned prefill check
    prefill_long: int  # tokens of the long prefill check (32k on a GPU)
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
    quantized: Quantized  # the quantized decode value check (batch 1)
    bench_decode: tuple[int, ...]
    bench_prefill: tuple[int, ...]
    bench_quantized: tuple[int, ...]
    prompt: int
    budget: int
    probe: Probe
    model: dict


LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
             "vocab_size": 128256, "rope_theta": 500000.0}
GPU = Scale(torch.device("cuda"), long=32768, short=8192, prefill=4096, prefill_long=32768, window_slots=8192,
            window=64, chunk=1024, compact=(2048, 4096), kivi_rows=8192, split_size=None, min_splits=16,
            heads=(32, 8), group7=(28, 4), wide=(16, 8), quantized=Quantized(slots=32768),
            bench_decode=(8192, 32768), bench_prefill=(8192, 32768), bench_quantized=(8192, 32768),
            prompt=32768, budget=2048,
            probe=Probe(far=2**31, slots=4096, queries=1024, split=512, rows_queries=2048, quant_slots=65536,
                        blocks=(64, 64)),
            model=LLAMA3_8B)
DRY = Scale(torch.device("cpu"), long=300, short=90, prefill=40, prefill_long=72, window_slots=70, window=5, chunk=16,
            compact=(20, 45), kivi_rows=32, split_size=64, min_splits=4, heads=(4, 2),
            group7=(7, 1), wide=(2, 1), quantized=Quantized(slots=72, residual=8, group=8, dim=32),
            bench_decode=(128,), bench_prefill=(32,), bench_quantized=(64,), prompt=64, budget=40,
            probe=Probe(far=4096, slots=48, queries=32, split=64, rows_queries=16, quant_slots=40, blocks=(16, 16)),
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


QUANTIZED_TOLERANCE = {"atol": 1e-5, "rtol": 1e-4, "relative": 1e-4}  # fp32 outputs, sums in another order
SCALE_ARGUMENTS = (2, 3, 6, 7)  # key scale, key zero, value scale, value zero


def in_fp32(args: tuple) -> tuple:
    """The quantized decode kernel's arguments with fp32 scales and zeros, for the reference: the kernel
    dequantizes in fp32, the reference in the scales' dtype (bf16 rounding of every key and value
    would dominate the comparison; converting bf16 to fp32 is exact)."""
    return tuple(a.float() if i in SCALE_ARGUMENTS else a for i, a in enumerate(args))


def quantized_layer(scale: Scale, batch: int, slots: int, keep: float = 0.9):
    """Arguments of the quantized decode kernel for a KIVI layer made by kvpress.kivi from random
    keys and values: `slots` quantized slots (a fraction `1 - keep` of them evicted, as holes) and
    `residual` full-precision ones, Llama-3-8B's heads on a GPU."""
    from kvpress import kivi as primitives

    q_heads, kv_heads = scale.heads
    layer, device = scale.quantized, scale.device
    generator = torch.Generator(device=device).manual_seed(slots)
    random = lambda *shape: torch.randn(*shape, generator=generator, device=device, dtype=torch.bfloat16)
    keys, values = random(batch, kv_heads, slots, layer.dim), random(batch, kv_heads, slots, layer.dim)
    key_codes, key_scale, key_zero, counts = primitives.quantize_key_blocks(keys, layer.bits, layer.group)
    value_codes, value_scale, value_zero = primitives.quantize_values(values, layer.bits, layer.group)
    block = primitives.block_of_slot(counts.expand(batch, kv_heads, -1), slots)
    valid = torch.rand(batch, kv_heads, slots + layer.residual, generator=generator, device=device) < keep
    valid[..., slots:] = True
    query = random(batch, q_heads, layer.dim)
    return (query, key_codes, key_scale, key_zero, block, value_codes, value_scale, value_zero,
            random(batch, kv_heads, layer.residual, layer.dim), random(batch, kv_heads, layer.residual, layer.dim),
            valid)


def check_quantized_decode(scale: Scale, batch: int = 1):
    layer = scale.quantized
    args = quantized_layer(scale, batch, layer.slots)
    kwargs = {"scaling": layer.dim ** -0.5, "bits": layer.bits, "return_logits": True}
    out, logits, lse = kivi.quantized_decode_attention_triton(*args, **kwargs)
    ref_out, ref_logits, ref_lse = kivi.quantized_decode_attention_reference(*in_fp32(args), **kwargs)
    close(out, ref_out, "output", **QUANTIZED_TOLERANCE)
    seen = torch.isfinite(ref_logits)
    assert torch.equal(torch.isfinite(logits), seen), "logits: -inf where a slot is not valid, finite elsewhere"
    close(logits[seen], ref_logits[seen], "logits", atol=1e-4, rtol=1e-5)
    close(lse, ref_lse, "log-sum-exp", atol=1e-4, rtol=1e-5)


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
    report.check(f"prefill {scale.prefill_long} tokens, attention + lse + mass (autotuned tiles on a GPU)",
                 lambda: check_prefill(scale, scale.prefill_long, scale.prefill_long, 128, bf16, keep=1.0,
                                       padded=False))
    report.check(f"prefill chunk of {scale.chunk} queries over {scale.prefill} slots, 30% invalid, padded rows",
                 lambda: check_prefill(scale, scale.chunk, scale.prefill, 128, bf16, keep=0.7, padded=True))
    report.check(f"SnapKV window of {scale.window} rows over {scale.window_slots} slots",
                 lambda: check_window(scale))
    report.check(f"compaction of {scale.compact[0]} of {scale.compact[1]} slots", lambda: check_compaction(scale))
    report.check("KIVI quantize bit-exact (2/4/8 bits, bf16/fp16)", lambda: check_kivi(scale))
    layer = scale.quantized
    report.check(f"KIVI {layer.bits}-bit decode kernel, {q_heads}/{kv_heads} heads, head dim {layer.dim}, "
                 f"{layer.slots} quantized + {layer.residual} residual slots, 10% evicted",
                 lambda: check_quantized_decode(scale))


def int64_section(scale: Scale, report: Report) -> None:
    """Offsets past `far` = 2**31 elements with every stride below it, so the kernels' own int64
    casts are what is tested (a stride of 2**31 or more reaches a kernel as an i64 argument and
    makes the product 64-bit anyway). Where each kernel's large offsets come from:

    - decode: `b * stride_kb` and `h * stride_kh` (b, h from the int64 program id), and
      `start * stride_ks` (the split's first slot, cast to int64); the tile then advances a 64-bit
      pointer;
    - prefill attention: `b`, `h` as decode, the query rows `first * stride_qm` (cast), and the
      output of more than 2**31 elements the launcher allocates (`b * stride_ob`); the slot loop
      advances a 64-bit pointer; prefill mass: `b`, `h`, the key tile `(tile * BLOCK_N) * stride_ks`
      (cast) and the query rows `first_row * stride_qm` (cast);
    - compaction: `b`, `h`, the kept slot `src * stride_ks` (loaded, cast) and the output rows
      `(bh * K + j) * D` (an output of more than 2**31 elements);
    - quantized decode: the packed codes' rows `(head * N + n) * D * bits / 8` (head from the int64
      program id); its launcher makes every operand contiguous, so only a layer of more than 2**31
      code bytes reaches them.

    Strided views of one random storage of a little more than `far` elements (a slice of a larger
    preallocated cache has such strides) reach the first kind: a batch stride of `far / 2`, a head
    stride of `far / (Hkv - 1)`, a slot stride (slots-major, as transformers' [B, S, H, D] layout)
    that puts the last decode split and the last key tiles past `far`, with prefill queries whose
    rows are `far / 960` apart (the last 64-row query tile starts past `far`); each is compared in
    full with the reference on contiguous copies. Tensors of more than `far` elements reach the rest (a query and output of 257 x
    2048 rows x 32 heads x 128 on a GPU; a quantized layer of 65 x 8 KV heads x 65536 slots); their
    first and last batch rows are compared. Offsets that need more memory than an H100 has are not
    probed (docs/kernels.md lists them). GPU memory: about 5 GiB for the storage, then at most
    about 12 GiB at a time."""
    int64_strided_views(scale, report)
    empty_cache(scale.device)
    int64_large_tensors(scale, report)


def int64_strided_views(scale: Scale, report: Report, dim: int | None = None) -> None:
    """The first half of the int64 probe: strided views of one storage (see `int64_section`)."""
    device, probe = scale.device, scale.probe
    far, dim = probe.far, dim or (128 if device.type == "cuda" else 16)
    q_heads, kv_heads = scale.heads
    dtype = torch.bfloat16
    ones = lambda n: torch.ones(n, device=device)

    def strided_views():
        """(name, shape, strides, decode split, the stride that reaches past `far`, query row stride) of
        key views; the slots-major view also takes its prefill queries from the storage, rows far apart."""
        slots, split = probe.slots, probe.split
        last_start = 8 * split  # the ninth decode split starts past far
        slot_stride = max(triton.cdiv(far, last_start), kv_heads * dim)
        batch_stride, head_stride = far // 2 + dim, triton.cdiv(far, kv_heads - 1) + dim
        query_stride = max(triton.cdiv(far, last_query_tile), q_heads * dim)
        return [("batch stride", (3, kv_heads, slots, dim), (batch_stride, slots * dim, dim, 1), None, batch_stride,
                 None),
                ("head stride", (1, kv_heads, slots, dim), (dim, head_stride, dim, 1), None, head_stride, None),
                ("slot stride (slots-major)", (1, kv_heads, last_start + 64, dim), (dim, dim, slot_stride, 1), split,
                 slot_stride, query_stride)]

    blocks = probe.blocks
    last_query_tile = (probe.queries - 1) // blocks[0] * blocks[0]  # first row of the last query tile
    assert last_query_tile > 0, f"the probe needs more than one query tile ({blocks[0]} rows)"
    views = strided_views()
    extent = lambda shape, strides: sum((n - 1) * st for n, st in zip(shape, strides)) + 1
    query_view = lambda q_stride: ((1, q_heads, probe.queries, dim), (dim, dim, q_stride, 1))
    value_shift = dim // 2  # values: the same views, half a row further (other numbers than the keys)
    size = max(max(extent(shape, strides), extent(*query_view(q_stride)) if q_stride else 0)
               for _, shape, strides, _, _, q_stride in views) + value_shift
    for name, shape, strides, _, _, q_stride in views:
        assert max(strides) < 2**31 and extent(shape, strides) > far, (name, strides)
        assert q_stride is None or (q_stride < 2**31 and last_query_tile * q_stride >= far), (name, q_stride)
    generator = torch.Generator(device=device).manual_seed(64)
    storage = torch.randn(size, generator=generator, device=device, dtype=dtype)  # freed on return

    def inputs(shape, strides, q_len, q_stride=None):
        key = storage.as_strided(shape, strides)
        value = storage.as_strided(shape, strides, value_shift)
        if q_stride is None:
            query = torch.randn(shape[0], q_heads, q_len, dim, generator=generator, device=device, dtype=dtype)
        else:  # query rows q_stride apart: the last query tile starts past far
            query = storage.as_strided(*query_view(q_stride))
        valid = torch.rand(*shape[:3], generator=generator, device=device) < 0.9
        valid[..., -q_len:] = True
        return query, key, value, valid

    def decode(shape, strides, split):
        query, key, value, valid = inputs(shape, strides, 1)
        kwargs = {"scaling": dim ** -0.5, "weights": ones(1)}
        out, mass = decode_module.decode_attention_triton(query, key, value, valid, split_size=split, **kwargs)
        if split is not None:
            splits = decode_module.split_count(shape[2], split)
            assert (splits - 1) * split * strides[2] >= far, "the last split must start past 2**31 elements"
        ref_out, ref_mass = decode_module.decode_attention_reference(query, key.contiguous(), value.contiguous(), valid,
                                                                     **kwargs)
        close(out, ref_out, "decode output", **OUTPUT_TOLERANCE[dtype])
        close(mass, ref_mass, "decode mass", **MASS_TOLERANCE)

    def prefill(shape, strides, q_stride):
        q_len = probe.queries
        query, key, value, valid = inputs(shape, strides, q_len, q_stride)
        kwargs = {"scaling": dim ** -0.5}
        out, lse = attention_with_lse_triton(query, key, value, valid, blocks=blocks, **kwargs)
        copies = query.contiguous(), key.contiguous(), value.contiguous()
        ref_out, ref_lse = attention_with_lse_reference(*copies, valid, **kwargs)
        close(out, ref_out, "prefill output", **OUTPUT_TOLERANCE[dtype])
        close(lse, ref_lse, "log-sum-exp", atol=1e-3, rtol=1e-5)
        mass = prefill_mass_triton(query, key, valid, weights=ones(q_len), lse=lse, blocks=blocks, **kwargs)
        ref_mass = prefill_mass_reference(*copies[:2], valid, weights=ones(q_len), **kwargs)
        close(mass, ref_mass, "prefill mass", **MASS_TOLERANCE)

    def compaction(shape, strides):
        _, key, value, valid = inputs(shape, strides, 1)
        batch, heads, slots = shape[:3]
        positions = torch.arange(slots, device=device).expand(batch, heads, slots)
        scores = torch.rand(batch, heads, slots, generator=generator, device=device)
        order = torch.rand(batch, heads, slots, generator=generator, device=device).argsort(-1)
        indices = order[..., : slots // 2].sort(-1).values
        indices[..., -1] = slots - 1  # the farthest slot
        got = compact_slots_triton(key, value, positions, scores, indices, valid)
        want = compact_slots_reference(key.contiguous(), value.contiguous(), positions, scores, indices, valid)
        for what, a, b in zip(("keys", "values", "positions", "scores", "valid"), got, want):
            equal(a, b, what)

    for name, shape, strides, split, stride, q_stride in views:
        where = f"{name} {stride}, largest offset {extent(shape, strides) - 1} elements"
        rows = f", query row stride {q_stride}" if q_stride else ""
        report.check(f"int64 offsets: decode, {where}", functools.partial(decode, shape, strides, split))
        report.check(f"int64 offsets: prefill attention + mass, {where}{rows}",
                     functools.partial(prefill, shape, strides, q_stride))
        report.check(f"int64 offsets: compaction, {where}", functools.partial(compaction, shape, strides))


def int64_large_tensors(scale: Scale, report: Report) -> None:
    """The second half of the int64 probe: tensors of more than `far` elements, all strides small,
    batch rows past `far` (see `int64_section`)."""
    device, probe = scale.device, scale.probe
    far, dim = probe.far, (128 if device.type == "cuda" else 16)
    q_heads, kv_heads = scale.heads
    dtype = torch.bfloat16
    ones = lambda n: torch.ones(n, device=device)
    blocks = probe.blocks
    q_len = probe.rows_queries
    rows_batch = far // (q_len * q_heads * dim) + 1

    def prefill_rows():
        query = torch.randn(rows_batch, q_len, q_heads, dim, device=device, dtype=dtype).transpose(1, 2)
        key = torch.randn(rows_batch, kv_heads, q_len, dim, device=device, dtype=dtype)
        value = torch.randn_like(key)
        valid = torch.ones(rows_batch, kv_heads, q_len, dtype=torch.bool, device=device)
        kwargs = {"scaling": dim ** -0.5}
        out, lse = attention_with_lse_triton(query, key, value, valid, blocks=blocks, **kwargs)
        assert out.numel() > far, "the output must pass 2**31 elements"
        mass = prefill_mass_triton(query, key, valid, weights=ones(q_len), lse=lse, blocks=blocks, **kwargs)
        for b in (0, rows_batch - 1):
            rows = slice(b, b + 1)
            ref_out, ref_lse = attention_with_lse_reference(query[rows], key[rows], value[rows], valid[rows], **kwargs)
            close(out[rows], ref_out, f"output of batch row {b}", **OUTPUT_TOLERANCE[dtype])
            close(lse[rows], ref_lse, f"log-sum-exp of batch row {b}", atol=1e-3, rtol=1e-5)
            ref_mass = prefill_mass_reference(query[rows], key[rows], valid[rows], weights=ones(q_len), **kwargs)
            close(mass[rows], ref_mass, f"mass of batch row {b}", **MASS_TOLERANCE)
        del out
        # compaction: the query as a [B, Hq, S, D] cache (slot stride Hq * D), every slot kept in reverse
        # order: an output of more than far elements
        positions = torch.arange(q_len, device=device).expand(rows_batch, q_heads, q_len)
        scores = torch.rand(q_len, device=device).expand(rows_batch, q_heads, q_len)
        small_values = torch.randn(rows_batch, q_heads, q_len, 16, device=device, dtype=dtype)
        indices = torch.arange(q_len - 1, -1, -1, device=device).expand(rows_batch, q_heads, q_len)
        got = compact_slots_triton(query, small_values, positions, scores, indices)
        assert got[0].numel() > far, "the kept keys must pass 2**31 elements"
        for b in (0, rows_batch - 1):
            rows = slice(b, b + 1)
            want = compact_slots_reference(query[rows], small_values[rows], positions[rows], scores[rows],
                                           indices[rows])
            for what, a, c in zip(("keys", "values", "positions", "scores"), got, want):
                equal(a[rows], c, f"kept {what} of batch row {b}")

    def quantized_rows():
        layer = Quantized(slots=probe.quant_slots, residual=32, dim=dim if device.type == "cuda" else 32,
                          group=32 if device.type == "cuda" else 8)
        packed = layer.dim * layer.bits // 8
        batch = far // (kv_heads * layer.slots * packed) + 1
        shape = (batch, kv_heads, layer.slots)
        blocks_per_head = triton.cdiv(layer.slots, layer.group)
        codes = lambda: torch.randint(0, 256, (*shape, packed), device=device, dtype=torch.uint8)
        params = lambda *s: (torch.rand(*s, device=device) * 0.1).to(dtype)
        key_codes, value_codes = codes(), codes()
        assert key_codes.numel() > far, "the codes must pass 2**31 bytes"
        block = (torch.arange(layer.slots, device=device) // layer.group).expand(shape)
        args = (torch.randn(batch, q_heads, layer.dim, device=device, dtype=dtype), key_codes,
                params(batch, kv_heads, blocks_per_head, layer.dim), params(batch, kv_heads, blocks_per_head, layer.dim),
                block, value_codes, params(*shape, layer.dim // layer.group), params(*shape, layer.dim // layer.group),
                torch.randn(batch, kv_heads, layer.residual, layer.dim, device=device, dtype=dtype),
                torch.randn(batch, kv_heads, layer.residual, layer.dim, device=device, dtype=dtype),
                torch.rand(batch, kv_heads, layer.slots + layer.residual, device=device) < 0.9)
        kwargs = {"scaling": layer.dim ** -0.5, "bits": layer.bits, "return_logits": True}
        out, _, lse = kivi.quantized_decode_attention_triton(*args, **kwargs)
        for b in (0, batch - 1):
            ref_out, _, ref_lse = kivi.quantized_decode_attention_reference(*in_fp32([a[b:b + 1] for a in args]),
                                                                            **kwargs)
            close(out[b:b + 1], ref_out, f"output of batch row {b}", **QUANTIZED_TOLERANCE)
            close(lse[b:b + 1], ref_lse, f"log-sum-exp of batch row {b}", atol=1e-4, rtol=1e-5)

    report.check(f"int64 offsets: prefill attention + mass and compaction, {rows_batch} x {q_len} rows x {q_heads} "
                 f"heads x {dim} (more than {far} elements, batch stride {q_len * q_heads * dim})", prefill_rows)
    empty_cache(device)
    report.check(f"int64 offsets: quantized decode, {probe.quant_slots} slots x {kv_heads} KV heads, codes of more "
                 f"than {far} bytes", quantized_rows)


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def quantized_section(scale: Scale, report: Report) -> None:
    """The KIVI decode kernel (output, logits and log-sum-exp for the mass) vs its PyTorch reference and
    vs SDPA decode over the same slots in bf16: what quantized storage costs per step. No target."""
    q_heads, kv_heads = scale.heads
    layer = scale.quantized
    rows = []
    for slots in scale.bench_quantized:
        args = quantized_layer(scale, 1, slots)
        kwargs = {"scaling": layer.dim ** -0.5, "bits": layer.bits, "return_logits": True}
        query = args[0].view(1, kv_heads, q_heads // kv_heads, layer.dim)
        key = torch.randn(1, kv_heads, slots + layer.residual, layer.dim, device=scale.device, dtype=torch.bfloat16)
        value = torch.randn_like(key)
        kernel = functools.partial(kivi.quantized_decode_attention_triton, *args, **kwargs)
        reference = functools.partial(kivi.quantized_decode_attention_reference, *args, **kwargs)
        sdpa = functools.partial(F.scaled_dot_product_attention, query, key, value, scale=kwargs["scaling"])
        for fn in (kernel, reference, sdpa):
            fn()
        times = [milliseconds(fn) for fn in (sdpa, reference, kernel)]
        rows.append([slots, *times, times[2] / times[1], times[2] / times[0]])
    table(f"Quantized decode: KIVI {layer.bits}-bit kernel vs its PyTorch reference and vs SDPA over bf16 (ms, "
          f"batch 1, {q_heads}/{kv_heads} heads, dim {layer.dim}, {layer.residual} residual slots)",
          ["slots", "SDPA bf16", "reference", "kernel", "kernel / reference", "kernel / SDPA"], rows)


# ||kernel-path logits - PyTorch-path logits|| / ||PyTorch-path logits|| at every step of the generation:
# bf16 weights and caches through 32 layers on a GPU, fp32 in the dry run
E2E_RELATIVE = {torch.bfloat16: 5e-2, torch.float32: 1e-4}
NEAR_TIE = 4.0  # a token the two paths choose differently: PyTorch's margin within 4x the RMS logit difference


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def greedy(model, ids, cache, steps: int, forced: torch.Tensor | None = None):
    """The prompt, then `steps - 1` decoding steps fed the greedy choice (or `forced [steps]`, another
    run's tokens, so two runs see the same inputs). Returns the choices `[steps]`, the logits of every
    step `[steps, V]` fp32, the prefill's seconds and each decoding step's seconds."""
    device = ids.device
    sync(device)
    start = time.perf_counter()
    logits = [model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()]
    sync(device)
    prefill = time.perf_counter() - start
    step_seconds = []
    for step in range(1, steps):
        token = forced[step - 1].view(1, 1) if forced is not None else logits[-1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        logits.append(model(token, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float())
        sync(device)
        step_seconds.append(time.perf_counter() - start)
    logits = torch.cat(logits)
    return logits.argmax(-1), logits, prefill, step_seconds


def compare_paths(tokens, logits, reference_logits, tolerance: float) -> str:
    """The kernel path's generation against the PyTorch path fed the same tokens: the relative logit
    error of every step within `tolerance`, and every token chosen differently a near tie (the
    PyTorch path's margin between its choice and the kernel path's within NEAR_TIE x the RMS logit
    difference of that step). Returns the agreement, for the report."""
    difference = logits - reference_logits
    relative = difference.norm(dim=-1) / reference_logits.norm(dim=-1)  # [steps]
    rms = difference.pow(2).mean(-1).sqrt()
    reference_tokens = reference_logits.argmax(-1)
    steps = torch.nonzero(tokens != reference_tokens).flatten().tolist()
    margins = [float(reference_logits[i, reference_tokens[i]] - reference_logits[i, tokens[i]]) for i in steps]
    worst = int(relative.argmax())
    summary = (f"{len(tokens) - len(steps)}/{len(tokens)} tokens equal; relative logit error max "
               f"{float(relative.max()):.1e} (step {worst}, tolerance {tolerance:.0e})")
    if steps:
        summary += "; chosen differently at steps " + ", ".join(
            f"{i} (margin {m:.3f}, RMS difference {float(rms[i]):.3f})" for i, m in zip(steps[:8], margins))
    print(f"kernel path vs PyTorch path: {summary}", flush=True)
    assert float(relative.max()) <= tolerance, f"relative logit error {float(relative.max()):.2e} at step " \
        f"{worst} > {tolerance:.0e}"
    far = [(i, m) for i, m in zip(steps, margins) if m > NEAR_TIE * float(rms[i])]
    assert not far, f"tokens chosen differently away from a near tie: (step, margin) {far[:4]}"
    return summary


def route_decoding_to_the_kernel_in_the_interpreter() -> bool:
    """Dry run: decoding steps of a pruned layer run the fused decode kernel in Triton's interpreter,
    as they run it compiled on a GPU (the switches tests/test_hot_path.py sets); prefill and
    compaction keep the PyTorch path on CPU tensors. `KVPRESS_TRITON=0` still turns it off."""
    attention_path = importlib.import_module("kvpress.attention_path")
    if not all(hasattr(attention_path, name) for name in ("fused_decode_fold", "FUSED_DECODE_BACKEND")):
        print("dry run: kvpress.attention_path has no fused-decode switches; both runs take the PyTorch path")
        return False
    attention_path.fused_decode_fold = lambda query: os.environ.get("KVPRESS_TRITON", "1") != "0"
    attention_path.FUSED_DECODE_BACKEND = "triton"
    return True


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
    if device.type == "cpu" and route_decoding_to_the_kernel_in_the_interpreter():
        print("dry run: decoding steps run the fused decode kernel (interpreted); prefill and compaction take "
              "the PyTorch path on CPU")

    h2o = f"PrunedCache(H2O(budget={scale.budget}))"
    makers = [("DynamicCache", DynamicCache), (h2o, lambda: PrunedCache(H2O(budget=scale.budget))),
              (f"PrunedCache(H2O(budget={scale.budget}), slack=64)",
               lambda: PrunedCache(H2O(budget=scale.budget), slack=64))]
    rows, kernel_run = [], None
    for name, make in makers:
        tokens, logits, prefill, steps = greedy(model, ids, make(), new_tokens)
        rows.append([name, prefill * 1000, statistics.median(steps) * 1000])
        if name == h2o:
            kernel_run = (tokens, logits)
    base = rows[0][2]
    judge = lambda row: ("ok" if row[2] < base else "MISSED") if device.type == "cuda" else "- (dry run)"
    rows = [row + [row[2] / base, "-" if i == 0 else judge(row)] for i, row in enumerate(rows)]
    table(f"End to end: Llama-3-8B shapes, {layers} layers, random {str(dtype)[6:]} weights, {scale.prompt}-token "
          f"prompt, batch 1, {new_tokens} greedy tokens (the first PrunedCache prefill includes the kernels' "
          f"compiles and autotuning; CUDA graphs: not applicable, both caches change shape every step)",
          ["cache", "prefill (ms)", "median ms per new token", "vs DynamicCache", "target: faster"], rows)
    report.timings += [[row[0], "plain", *row[1:]] for row in rows[1:]]

    def kernel_path_equals_pytorch_path():
        previous = os.environ.get("KVPRESS_TRITON")
        os.environ["KVPRESS_TRITON"] = "0"
        try:
            _, reference_logits, prefill, steps = greedy(model, ids, PrunedCache(H2O(budget=scale.budget)), new_tokens,
                                                         forced=kernel_run[0])
        finally:
            if previous is None:
                del os.environ["KVPRESS_TRITON"]
            else:
                os.environ["KVPRESS_TRITON"] = previous
        print(f"PyTorch path (KVPRESS_TRITON=0): prefill {prefill * 1000:.0f} ms, median "
              f"{statistics.median(steps) * 1000:.1f} ms per new token", flush=True)
        compare_paths(*kernel_run, reference_logits, E2E_RELATIVE[dtype])

    report.check(f"end to end, {scale.prompt}-token prompt, {new_tokens} tokens: {h2o} on the kernels equals the "
                 f"PyTorch path (KVPRESS_TRITON=0) fed the same tokens, logits within {E2E_RELATIVE[dtype]:.0e}, "
                 f"any other choice a near tie", kernel_path_equals_pytorch_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="values,decode,prefill,quantized,e2e")
    parser.add_argument("--results", help="append PASS/FAIL and timing-target lines to this file")
    parser.add_argument("--e2e-layers", type=int, default=32)
    parser.add_argument("--e2e-tokens", type=int, default=32)
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    args = parser.parse_args()
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
                "quantized": lambda: quantized_section(scale, report),
                "e2e": lambda: e2e_section(scale, report, args.e2e_layers if not args.dry_run else 2,
                                           args.e2e_tokens if not args.dry_run else 6)}
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
