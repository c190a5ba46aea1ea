"""What PrunedCache costs and saves, measured side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/overhead.py [--quick]

Prints, for a tiny random Llama and for SmolLM2-135M-Instruct (CPU, fp32, sdpa):
1. decode time per token, PrunedCache without eviction vs DynamicCache (target <= 1.03x on SmolLM2);
2. prefill time with H2O and SnapKV scoring vs plain sdpa prefill (target <= 1.3x);
3. decode time per token after a 4k-token prompt, H2O budget 512 (slack 0 and 16) vs DynamicCache
   (target <= 0.70x at slack 0), and the cost of evicting at every decoding step after a 1k-token
   prompt (H2O budget 0.5, slack 0: target <= 1.10x);
4. bytes allocated over bytes of the valid slots after decoding, per policy (target <= 1.1 for
   AdaKV(SnapKV) at 0.2; SpAtten's switched-off heads hold none), and PyTorch ops per decoding step
   against DynamicCache;
5. peak extra memory of the prefill scoring pass of one layer at 2k and 8k tokens (target: linear);
6. peak memory of a whole SmolLM2 prefill with KVCompose (every layer keeps the prompt until the
   cross-layer allocation, then compacts) vs DynamicCache, at 2k and 8k tokens (target <= 1.1x);
7. decoding on 4-bit KIVI storage after a 1k-token prompt: time per token vs DynamicCache, host syncs
   and aten ops per step.

    OMP_NUM_THREADS=1 python benchmarks/overhead.py --prefill-memory   # section 6 only
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --quantized        # section 7 only
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --skip-prefill-memory   # sections 1-5 and 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvpress import KVQuant, PrunedCache, PrunedLayer, load_model
from kvpress.attention_path import row_weights
from kvpress.policies import H2O, TOVA, AdaKV, KVCompose, QuantizedPruning, SnapKV, SpAtten
from kvpress.reference_attention import grouped_attention

torch.set_num_threads(1)


def timed(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` runs, after one warm-up."""
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def decode_per_token(model, ids, make_cache, steps: int) -> float:
    """Seconds per decoding step after prefilling `ids` (prefill excluded)."""
    with torch.no_grad():
        cache = make_cache()
        out = model(ids, cache=cache)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / steps


def prefill_seconds(model, ids, make_cache, repeats: int) -> float:
    def run():
        with torch.no_grad():
            model(ids, cache=make_cache())
    return timed(run, repeats)


class PeakRSS:
    """Peak resident memory above the starting point, sampled every millisecond."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def scoring_peak_mib(length: int) -> float:
    """Peak extra memory of H2O's prefill signal for one SmolLM2-shaped layer, measured in a fresh
    process so that no memory freed earlier in this run hides the allocation."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_scoring_peak_mib, (length,))


def _scoring_peak_mib(length: int, heads=9, kv_heads=3, dim=64) -> float:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, length, dim, generator=gen)
    k = torch.randn(1, kv_heads, length, dim, generator=gen)
    v = torch.randn(1, kv_heads, length, dim, generator=gen)
    valid = torch.ones(1, kv_heads, length, dtype=torch.bool)
    weights = row_weights(length, None, 1.0, "cpu")
    with PeakRSS() as peak:
        grouped_attention(q, k, v, valid, scaling=dim ** -0.5, weights=weights)
    return peak.extra_mib


def prefill_peak_mib(cache_kind: str, length: int) -> float:
    """Peak resident memory of one SmolLM2 prefill of `length` tokens above the loaded model, with a
    `DynamicCache` ("dynamic") or `PrunedCache(KVCompose(budget=0.2))` ("kvcompose", the allocation
    and compaction included), each in a fresh process. glibc's mmap threshold is fixed in that process
    (`MALLOC_MMAP_THRESHOLD_`): by default it grows after large frees, so later tensors come from the
    heap, which is not returned to the system, and resident memory then depends on allocation history
    (measured: 1.1 to 1.9 GiB for one 8k prefill); with a fixed threshold every large tensor is mapped
    and returned when freed, so resident memory follows the live tensors."""
    import multiprocessing

    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # read by the spawned process at start
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_prefill_peak_mib, (cache_kind, length))
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous


def _prefill_peak_mib(cache_kind: str, length: int) -> float:
    torch.set_num_threads(1)
    model, _ = load_model("smollm2")
    ids = torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(5))
    cache = DynamicCache() if cache_kind == "dynamic" else PrunedCache(KVCompose(budget=0.2))
    with torch.no_grad(), PeakRSS() as peak:
        model(ids, cache=cache, use_cache=True, logits_to_keep=1)
        if cache_kind != "dynamic":
            cache.end_prefill()
    return peak.extra_mib


def prefill_memory_table(repeats: int = 3) -> list[str]:
    """Median (and range) over `repeats` fresh processes per cache, alternating the two caches: a single
    sample of resident memory varies by tens of MiB from run to run (allocator timing)."""
    lines = [("| SmolLM2-135M prefill (fp32, sdpa, CPU) | KVCompose 0.2 peak extra MiB, median (range) "
              "| DynamicCache peak extra MiB, median (range) | ratio of medians | target |"),
             "| --- | --- | --- | --- | --- |"]
    for length in (2048, 8192):
        ours, base = [], []
        for _ in range(repeats):
            ours.append(prefill_peak_mib("kvcompose", length))
            base.append(prefill_peak_mib("dynamic", length))
        mid_ours, mid_base = statistics.median(ours), statistics.median(base)
        lines.append(f"| {length} tokens | {mid_ours:.0f} ({min(ours):.0f}-{max(ours):.0f}) | {mid_base:.0f} "
                     f"({min(base):.0f}-{max(base):.0f}) | {mid_ours / mid_base:.2f}x | <= 1.1x |")
    return lines


def tiny_llama():
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def storage_ratio(cache) -> float:
    """Bytes of key/value storage allocated over the bytes of the valid slots, summed over layers."""
    allocated = valid = 0
    for layer in cache.layers:
        if isinstance(layer, PrunedLayer):
            slot = layer.keys[0, 0, 0].nbytes + layer.values[0, 0, 0].nbytes
            allocated += layer.slots.kv_nbytes
            valid += int(layer.valid.sum()) * slot
    return allocated / valid


SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "item"}  # ops that copy a device value to the host


def decode_ops(model, ids, make_cache, steps: int = 8) -> tuple[float, float]:
    """aten ops and device-to-host syncs per decoding step (after prefill and one warm-up step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            Count.syncs += func.overloadpacket.__name__ in SYNC_OPS
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        cache = make_cache()
        token = model(ids, cache=cache).logits[:, -1:].argmax(-1)
        token = model(token, cache=cache).logits[:, -1:].argmax(-1)
        with Count():
            for _ in range(steps):
                token = model(token, cache=cache).logits[:, -1:].argmax(-1)
    return Count.ops / steps, Count.syncs / steps


def quantized_decode_table(model, steps: int) -> list[str]:
    """Decoding on KIVI 4-bit storage after a 1000-token prompt: time per token against DynamicCache,
    host syncs and aten ops per step (section 7)."""
    ids = torch.randint(3, model.config.vocab_size, (1, 1000), generator=torch.Generator().manual_seed(4))
    quant = KVQuant(bits=4, group_size=32, residual=128)
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    memory = 500 * layers * heads * 2 * 64 * 4  # what 500 fp32 slots per head take
    caches = (("no eviction, 4-bit storage", lambda: PrunedCache(None, quantization=quant)),
              ("H2O budget 0.5, slack 0, 4-bit storage", lambda: PrunedCache(H2O(budget=0.5), quantization=quant)),
              ("QuantizedPruning(SnapKV), 4 bits, memory of 500 fp32 slots",
               lambda: PrunedCache(QuantizedPruning(SnapKV(window=16), memory=memory, bits=4))))
    header = "| SmolLM2-135M, 1000-token prompt | decode/token | DynamicCache | ratio | host syncs per step | aten ops per step |"
    lines = [header, "| --- | --- | --- | --- | --- | --- |"]
    base = decode_per_token(model, ids, DynamicCache, steps)
    for name, make in caches:
        ours = decode_per_token(model, ids, make, steps)
        ops, syncs = decode_ops(model, ids, make)
        lines.append(f"| {name} | {ours * 1e3:.2f} ms | {base * 1e3:.2f} ms | {ours / base:.2f}x | {syncs:.0f} | {ops:.0f} |")
    return lines


def row(name: str, ours: float, base: float, target: str) -> str:
    return f"| {name} | {ours * 1e3:.2f} ms | {base * 1e3:.2f} ms | {ours / base:.2f}x | {target} |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter prompts, fewer repeats")
    parser.add_argument("--prefill-memory", action="store_true",
                        help="only section 6: peak prefill memory of KVCompose vs DynamicCache")
    parser.add_argument("--skip-prefill-memory", action="store_true",
                        help="sections 1-5 only (section 6 spawns 12 processes of 2k and 8k prefills)")
    parser.add_argument("--quantized", action="store_true", help="only section 7: decoding on 4-bit storage")
    args = parser.parse_args(argv)
    if args.prefill_memory:
        print("\n".join(prefill_memory_table()))
        return 0
    steps, repeats = (8, 2) if args.quick else (24, 3)
    if args.quantized:
        print("\n".join(quantized_decode_table(load_model("smollm2")[0], steps)))
        return 0
    long_prompt = 1024 if args.quick else 4096
    lines = ["| measurement | kvpress | baseline | ratio | target |", "| --- | --- | --- | --- | --- |"]

    tiny = tiny_llama()
    smol, _ = load_model("smollm2")
    for label, model, prompt in (("tiny Llama", tiny, 512), ("SmolLM2-135M", smol, 512)):
        vocab = model.config.vocab_size
        ids = torch.randint(3, vocab, (1, prompt), generator=torch.Generator().manual_seed(1))
        base = statistics.median(decode_per_token(model, ids, DynamicCache, steps) for _ in range(repeats))
        ours = statistics.median(decode_per_token(model, ids, lambda: PrunedCache(None), steps)
                                 for _ in range(repeats))
        lines.append(row(f"{label}: decode/token, no eviction vs DynamicCache ({prompt}-token prompt)",
                         ours, base, "<= 1.03x" if label.startswith("SmolLM2") else "(tiny model)"))

    prompt = 1024 if args.quick else 2048
    ids = torch.randint(3, smol.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(2))
    base = prefill_seconds(smol, ids, DynamicCache, repeats)
    for name, policy in (("H2O", H2O(budget=0.5)), ("SnapKV", SnapKV(budget=0.5))):
        ours = prefill_seconds(smol, ids, lambda policy=policy: PrunedCache(policy), repeats)
        lines.append(row(f"SmolLM2-135M: prefill with {name} scoring + eviction vs sdpa ({prompt} tokens)",
                         ours, base, "<= 1.3x"))

    ids = torch.randint(3, smol.config.vocab_size, (1, long_prompt), generator=torch.Generator().manual_seed(3))
    base = decode_per_token(smol, ids, DynamicCache, steps)
    for slack in (0, 16):
        ours = decode_per_token(smol, ids, lambda slack=slack: PrunedCache(H2O(budget=512, window=32), slack=slack),
                                steps)
        lines.append(row(f"SmolLM2-135M: decode/token after {long_prompt} tokens, H2O budget 512, slack {slack} "
                         "vs DynamicCache", ours, base, "<= 0.70x" if slack == 0 else "faster"))

    ids = torch.randint(3, smol.config.vocab_size, (1, 1000), generator=torch.Generator().manual_seed(4))
    base = decode_per_token(smol, ids, DynamicCache, steps)
    for name, policy, slack in (("H2O", H2O(budget=0.5), 0), ("SnapKV", SnapKV(budget=0.5), 0),
                                ("SnapKV", SnapKV(budget=0.5), 16)):
        ours = decode_per_token(smol, ids, lambda policy=policy, slack=slack: PrunedCache(policy, slack=slack), steps)
        lines.append(row(f"SmolLM2-135M: decode/token after 1000 tokens, {name} budget 0.5, slack {slack}, "
                         "evicting every step (or every 16) vs DynamicCache", ours, base,
                         "<= 1.10x" if name == "H2O" else "(cost of eviction)"))

    print("\n".join(lines))
    print()
    print("| SmolLM2-135M, 1000-token prompt, 8 decoding steps | storage allocated / valid slots | target |")
    print("| --- | --- | --- |")
    for name, policy in (("H2O 0.2", H2O(budget=0.2)), ("SnapKV 0.2", SnapKV(budget=0.2)),
                         ("AdaKV(SnapKV) 0.2", AdaKV(SnapKV(budget=0.2))), ("SpAtten 0.2", SpAtten(budget=0.2))):
        cache = PrunedCache(policy)
        decode_per_token(smol, ids, lambda cache=cache: cache, 8)
        print(f"| {name} | {storage_ratio(cache):.2f} | {'<= 1.1' if name.startswith('AdaKV') else ''} |")
    print()
    print("| SmolLM2-135M, 1000-token prompt | aten ops per decoding step | DynamicCache | ratio |")
    print("| --- | --- | --- | --- |")
    base_ops = decode_ops(smol, ids, DynamicCache)[0]
    for name, policy in (("H2O", H2O(budget=0.5)), ("SnapKV", SnapKV(budget=0.5)), ("TOVA", TOVA(budget=0.5))):
        ops = decode_ops(smol, ids, lambda policy=policy: PrunedCache(policy))[0]
        print(f"| {name} budget 0.5, slack 0 | {ops:.0f} | {base_ops:.0f} | {ops / base_ops:.2f}x |")
    print()
    print("| prefill scoring, one SmolLM2 layer (9 q / 3 kv heads, dim 64) | peak extra MiB | naive n x n fp32 MiB |")
    print("| --- | --- | --- |")
    for length in (2048, 8192):
        naive = 9 * length * length * 4 / 2**20
        print(f"| {length} tokens | {scoring_peak_mib(length):.0f} | {naive:.0f} |")
    print()
    print("\n".join(quantized_decode_table(smol, steps)))
    if not args.skip_prefill_memory:
        print()
        print("\n".join(prefill_memory_table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
