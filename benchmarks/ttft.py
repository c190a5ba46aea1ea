"""LazyLLM against a full prefill: time to first token and total generation time, measured side by side.

For each prompt length, the full cache (`DynamicCache`) and `PrunedCache(LazyLLM(schedule))` run back to
back on the same prompt (real text from `pydoc_data.topics`, the Python language reference): the
prefill forward that yields the first token (time to first token), then `--new-tokens` greedy steps
(total time). Printed per length: both times, their ratios (full / LazyLLM, above 1 = LazyLLM faster),
the share of token-layer computations LazyLLM skipped (revivals count as computations), tokens revived,
and whether the first token and the generated tokens agree with the full cache.

    OMP_NUM_THREADS=1 python benchmarks/ttft.py                       # SmolLM2-135M on CPU, 2k/4k/8k
    python benchmarks/ttft.py --llama3-8b --device cuda --results r.txt   # random-weight Llama-3-8B shape (GPU)
    python benchmarks/ttft.py --llama3-8b --tiny --layers 8 --lengths 64,128  # the GPU check's dry run

`--results FILE` appends `TARGET ok|MISSED` lines (time to first token at least 1.5x faster at the
longest length), as benchmarks/gpu_check.sh collects them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pydoc_data.topics import topics

import torch
from transformers import DynamicCache

from kvpress import PrunedCache
from kvpress.policies import LazyLLM

TARGET = 1.5  # time to first token, full / LazyLLM, at the longest length (issue 14)


LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8, "rope_theta": 500000.0}
TINY = {"vocab_size": 101, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2}  # gpu_check.sh --dry-run: the same code path in seconds on a CPU


def llama3_8b(device: str, dtype: torch.dtype, layers: int, shape: dict = LLAMA3_8B):
    """A random-weight model with Llama-3-8B's shapes (32 layers, 32 query / 8 KV heads, hidden 4096),
    initialised straight in `dtype` (no fp32 copy of 8B parameters first)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=131072)
    config._attn_implementation = "sdpa"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    return model


def prompt_ids(tokenizer, length: int, vocab: int) -> torch.Tensor:
    if tokenizer is None:  # random-weight model: random ids (the text means nothing to it)
        return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(length))
    text = "\n\n".join(topics[name] for name in sorted(topics))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < length:
        raise ValueError(f"--lengths: at most {len(ids)} tokens of text are available, got {length}")
    return torch.tensor([ids[:length]])


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run(model, ids, cache, new_tokens: int) -> dict:
    """Prefill (first token), then greedy decoding; seconds and tokens."""
    device = ids.device
    sync(device)
    start = time.perf_counter()
    logits = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    token = logits.argmax(-1, keepdim=True)
    sync(device)
    first = time.perf_counter() - start
    tokens = [int(token)]
    for _ in range(new_tokens - 1):
        token = model(token, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    sync(device)
    return {"ttft": first, "total": time.perf_counter() - start, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--llama3-8b", action="store_true", help="random-weight Llama-3-8B shapes instead of --model")
    parser.add_argument("--layers", type=int, default=32, help="layers of the --llama3-8b model")
    parser.add_argument("--tiny", action="store_true", help="with --llama3-8b: a tiny random Llama of --layers "
                                                              "layers instead (the GPU check's dry run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs per length; medians are printed")
    parser.add_argument("--schedule", default=None, help="LazyLLM schedule, e.g. 8:0.7/16:0.5/24:0.3 (default: "
                                                         "LazyLLM's default)")
    parser.add_argument("--results", default=None, help="append TARGET lines to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    if args.llama3_8b:
        shape, what = (TINY, "tiny random Llama") if args.tiny else (LLAMA3_8B, "random Llama-3-8B shape")
        model, tokenizer, name = llama3_8b(args.device, dtype, args.layers, shape), None, f"{what} ({args.layers} layers)"
    else:
        from kvpress import load_model

        model, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
        name = args.model
    policy = LazyLLM(schedule=args.schedule) if args.schedule else LazyLLM()
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"{name}, {args.device} {dtype}, LazyLLM schedule {policy.schedule}, {args.new_tokens} new tokens, "
          f"{args.repeats} pair(s) per length")
    # warm-up: kernels, allocator, first-call overheads
    warm = prompt_ids(tokenizer, 64, model.config.vocab_size).to(args.device)
    run(model, warm, DynamicCache(), 2)
    run(model, warm, PrunedCache(policy), 2)
    print("| tokens | TTFT full s | TTFT LazyLLM s | TTFT ratio | total full s | total LazyLLM s | total ratio "
          "| token-layers skipped | revived | first token same | tokens same |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    ratio = None
    for length in lengths:
        ids = prompt_ids(tokenizer, length, model.config.vocab_size).to(args.device)
        full, lazy = [], []
        for _ in range(args.repeats):
            full.append(run(model, ids, DynamicCache(), args.new_tokens))
            cache = PrunedCache(policy)
            lazy.append(run(model, ids, cache, args.new_tokens))
        state = cache.shared_state(cache.chain[0])
        ttft = [statistics.median(r["ttft"] for r in runs) for runs in (full, lazy)]
        total = [statistics.median(r["total"] for r in runs) for runs in (full, lazy)]
        same = sum(a == b for a, b in zip(full[0]["tokens"], lazy[0]["tokens"]))
        ratio = ttft[0] / ttft[1]
        print(f"| {length} | {ttft[0]:.2f} | {ttft[1]:.2f} | {ratio:.2f}x | {total[0]:.2f} | {total[1]:.2f} | "
              f"{total[0] / total[1]:.2f}x | {policy.skipped_share(cache):.1%} | {state.revived} | "
              f"{full[0]['tokens'][0] == lazy[0]['tokens'][0]} | {same}/{args.new_tokens} |", flush=True)
    if args.results and ratio is not None:
        verdict = "-" if args.tiny else "ok" if ratio >= TARGET else "MISSED"  # a tiny model has no target
        with open(args.results, "a") as handle:
            handle.write(f"TARGET {verdict}: LazyLLM time to first token {ratio:.2f}x faster than a full prefill at "
                         f"{lengths[-1]} tokens ({name}; target >= {TARGET}x)\n")


if __name__ == "__main__":
    main()
