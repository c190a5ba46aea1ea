"""Benchmarks of the Triton kernels on a CUDA GPU (issue 3's targets); prints markdown tables.

    python benchmarks/kernels_bench.py [--sections decode,prefill,e2e] [--e2e-layers 4]

decode   fused decode attention + mass + running-score fold vs attention alone
         (flash-attn's flash_attn_with_kvcache where installed, else SDPA with the G query heads of
         each KV head as G query rows), 8k/32k/128k slots, batch 1 and 8, 32 q heads, 8 KV heads,
         dim 128, bf16. Target: fused <= 1.2x.
prefill  per-slot mass of every query row (H2O) from a given row log-sum-exp vs a causal
         flash-attn/SDPA prefill, 8k and 32k tokens, batch 1, same heads; peak extra memory.
         Target: <= 0.6x, memory O(n).
e2e      Llama-3-8B-shaped random weights (only the first --e2e-layers layers), greedy decoding
         from a 32k prompt: H2O budget 2048 vs DynamicCache, ms per new token. Target: faster.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton.testing

from kvpress.attention import grouped_attention
from kvpress.triton_kernels.decode_attention import decode_attention_triton
from kvpress.triton_kernels.prefill_mass import attention_with_lse_triton, prefill_mass_triton

try:
    from flash_attn import flash_attn_func, flash_attn_with_kvcache
except ImportError:
    flash_attn_func = flash_attn_with_kvcache = None

Q_HEADS, KV_HEADS, DIM = 32, 8, 128
DTYPE = torch.bfloat16
DEVICE = torch.device("cuda")


def bench(fn) -> float:
    """Median milliseconds of `fn` (Triton's do_bench: warm-up, L2 flush between runs)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def torch_path(fn):
    """Run `fn` with the kernels switched off: kvpress.attention' PyTorch path on CUDA tensors."""
    os.environ["KVPRESS_TRITON"] = "0"
    try:
        return fn()
    finally:
        os.environ.pop("KVPRESS_TRITON", None)


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in row) + " |")
    sys.stdout.flush()


def decode_case(batch: int, slots: int) -> list:
    """One decode row: baseline, fused, output-only and torch-path milliseconds."""
    scaling = DIM ** -0.5
    query = torch.randn(batch, Q_HEADS, 1, DIM, device=DEVICE, dtype=DTYPE)
    key = torch.randn(batch, KV_HEADS, slots, DIM, device=DEVICE, dtype=DTYPE)
    value = torch.randn_like(key)
    valid = torch.rand(batch, KV_HEADS, slots, device=DEVICE) < 0.95
    valid[..., -1] = True
    weights = torch.ones(1, device=DEVICE)
    scores = torch.zeros(batch, KV_HEADS, slots, device=DEVICE)

    def fused():
        decode_attention_triton(query, key, value, valid, scaling=scaling, weights=weights, scores=scores)

    def output_only():
        decode_attention_triton(query, key, value, valid, scaling=scaling)

    def torch_signals():
        grouped_attention(query, key, value, valid, scaling=scaling, weights=weights)

    if flash_attn_with_kvcache is not None:
        q_fa = query.transpose(1, 2).contiguous()  # [B, 1, Hq, D]
        k_fa, v_fa = key.transpose(1, 2).contiguous(), value.transpose(1, 2).contiguous()
        lengths_fa = torch.full((batch,), slots, dtype=torch.int32, device=DEVICE)

        def baseline():
            flash_attn_with_kvcache(q_fa, k_fa, v_fa, cache_seqlens=lengths_fa, softmax_scale=scaling)
    else:
        q_sdpa = query.view(batch, KV_HEADS, Q_HEADS // KV_HEADS, DIM)

        def baseline():
            F.scaled_dot_product_attention(q_sdpa, key, value, scale=scaling)

    t_fused, t_out, t_base = bench(fused), bench(output_only), bench(baseline)
    t_torch = torch_path(lambda: bench(torch_signals)) if batch * slots <= 8 * 32768 else "-"
    return [batch, slots, t_base, t_fused, t_out, t_torch, t_fused / t_base,
            "ok" if t_fused <= 1.2 * t_base else "MISSED"]


def decode_section(lengths=(8192, 32768, 131072), batches=(1, 8)) -> None:
    baseline_name = "flash_attn_with_kvcache" if flash_attn_with_kvcache else "SDPA (G rows per KV head)"
    rows = []
    for batch in batches:
        for slots in lengths:
            rows.append(decode_case(batch, slots))
            torch.cuda.empty_cache()
    table(f"Decode: fused attention + mass + score fold vs {baseline_name} (ms, bf16, 32/8 heads, dim 128)",
          ["batch", "slots", "baseline", "fused", "kernel, output only", "torch path (signals.py)",
           "fused / baseline", "target <= 1.2x"], rows)


def prefill_case(n: int) -> tuple[list, list]:
    """One prefill row (milliseconds) and its memory rows."""
    scaling = DIM ** -0.5
    query = torch.randn(1, Q_HEADS, n, DIM, device=DEVICE, dtype=DTYPE)
    key = torch.randn(1, KV_HEADS, n, DIM, device=DEVICE, dtype=DTYPE)
    value = torch.randn_like(key)
    valid = torch.ones(1, KV_HEADS, n, dtype=torch.bool, device=DEVICE)
    weights = torch.ones(n, device=DEVICE)
    if flash_attn_func is not None:
        q_fa, k_fa, v_fa = (t.transpose(1, 2).contiguous() for t in (query, key, value))

        def baseline():
            flash_attn_func(q_fa, k_fa, v_fa, softmax_scale=scaling, causal=True)
    else:
        k_rep = key.repeat_interleave(Q_HEADS // KV_HEADS, dim=1)
        v_rep = value.repeat_interleave(Q_HEADS // KV_HEADS, dim=1)

        def baseline():
            F.scaled_dot_product_attention(query, k_rep, v_rep, is_causal=True, scale=scaling)

    _, lse = attention_with_lse_triton(query, key, value, valid, scaling=scaling)

    def mass_from_lse():
        prefill_mass_triton(query, key, valid, scaling=scaling, weights=weights, lse=lse)

    def lse_then_mass():
        prefill_mass_triton(query, key, valid, scaling=scaling, weights=weights)

    def attention_and_lse():
        attention_with_lse_triton(query, key, value, valid, scaling=scaling)

    t_base, t_mass, t_both = bench(baseline), bench(mass_from_lse), bench(lse_then_mass)
    t_attn = bench(attention_and_lse)
    row = [n, t_base, t_mass, t_both, t_attn, t_mass / t_base, "ok" if t_mass <= 0.6 * t_base else "MISSED"]
    memory_rows = []
    for name, fn in (("mass from given lse", mass_from_lse), ("lse pass + mass", lse_then_mass)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        memory_rows.append([n, name, extra / 2**20, extra / (KV_HEADS * n), Q_HEADS * n * n * 4 / 2**20])
    return row, memory_rows


def prefill_section(lengths=(8192, 32768)) -> None:
    baseline_name = "flash_attn_func" if flash_attn_func else "SDPA causal (flash backend)"
    rows, memory_rows = [], []
    for n in lengths:
        row, memory = prefill_case(n)
        rows.append(row)
        memory_rows.extend(memory)
        torch.cuda.empty_cache()
    table(f"Prefill mass (all rows, H2O) vs {baseline_name} prefill (ms, batch 1, bf16)",
          ["tokens", "baseline attention", "mass from lse", "lse pass + mass", "our attention + lse",
           "mass / baseline", "target <= 0.6x"], rows)
    table("Prefill mass: peak extra GPU memory (outputs included)",
          ["tokens", "pass", "extra MiB", "bytes per KV head per token", "an n x n fp32 score matrix, MiB"],
          memory_rows)


LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
             "vocab_size": 128256}


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def e2e_section(layers: int, new_tokens: int, prompt: int = 32768, budget: int = 2048, shapes=None) -> None:
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from kvpress import PrunedCache
    from kvpress.policies import H2O

    config = LlamaConfig(**(shapes or LLAMA3_8B), num_hidden_layers=layers, max_position_embeddings=131072,
                         rope_theta=500000.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(DTYPE).eval()
    ids = torch.randint(0, config.vocab_size, (1, prompt), device=DEVICE)

    def run(make_cache, count):
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                                 cache=make_cache(), pad_token_id=0)
        sync()
        return time.perf_counter() - start, out

    results, rows = {}, []
    makers = [("DynamicCache", lambda: DynamicCache(config=config)),
              (f"PrunedCache(H2O(budget={budget}))", lambda: PrunedCache(H2O(budget=budget), config=config)),
              (f"PrunedCache(H2O(budget={budget}), slack=64)",
               lambda: PrunedCache(H2O(budget=budget), config=config, slack=64))]
    for name, make in makers:
        run(make, 2)  # warm-up: compile and autotune every kernel
        t_one, _ = run(make, 1)
        t_many, _ = run(make, 1 + new_tokens)
        per_token = (t_many - t_one) / new_tokens * 1000
        results[name] = per_token
        rows.append([name, t_one * 1000, per_token])
    base = results["DynamicCache"]
    rows = [row + [row[2] / base, "-" if i == 0 else ("ok" if row[2] < base else "MISSED")]
            for i, row in enumerate(rows)]
    table(f"End to end: Llama-3-8B shapes, first {layers} of 32 layers, random bf16 weights, {prompt}-token "
          f"prompt, batch 1, {new_tokens} greedy tokens",
          ["cache", "prefill + 1 token (ms)", "ms per new token", "vs DynamicCache", "target: faster"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="decode,prefill,e2e")
    parser.add_argument("--e2e-layers", type=int, default=4)
    parser.add_argument("--e2e-tokens", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels_bench.py needs a CUDA GPU")
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"flash-attn: {'yes' if flash_attn_func else 'no'}")
    sections = args.sections.split(",")
    for name, run in (("decode", decode_section), ("prefill", prefill_section),
                      ("e2e", lambda: e2e_section(args.e2e_layers, args.e2e_tokens))):
        if name in sections:
            start = time.perf_counter()
            try:
                run()
            except Exception as error:  # noqa: BLE001 - one failed section must not hide the others
                print(f"\n### {name}: FAILED: {type(error).__name__}: {error}")
                import traceback

                traceback.print_exc(file=sys.stdout)
            print(f"\n({name} took {time.perf_counter() - start:.0f} s)")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
