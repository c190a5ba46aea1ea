"""What KVzip's prefill costs against a plain prefill (issue 22: at most 3x at 2k tokens on SmolLM2).

    OMP_NUM_THREADS=1 python benchmarks/kvzip_cost.py [--tokens 2048] [--runs 3] [--budget 0.2]

One prompt of `--tokens` tokens (Python language-reference text in SmolLM2's chat template, cut to
length before the template's reply header), prefilled `--runs` times each way, alternating run by
run so both see the same machine load: a plain prefill (`model(ids, cache=PrunedCache(None),
logits_to_keep=1)`) and KVzip's (`PrunedCache(KVzip(budget)).prefill(..., logits_to_keep=1)`: the
prompt, its reconstruction and the compression). Both compute the last position's logits only. One
untimed warm-up of each first. Prints every run with the 1-minute load average read after it, then
the medians and their ratio, with the commit measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path
from pydoc_data.topics import topics

import torch

from kvpress import PrunedCache, load_model
from kvpress.policies import KVzip, ReconstructionPrompt

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The commit measured, `+dirty` when the working tree differs from it."""
    def git(*args):
        return subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def prompt_ids(tokenizer, tokens: int) -> torch.Tensor:
    """`[1, tokens]`: a user turn of language-reference text in the chat template, the text cut so that
    the prompt, reply header included, has exactly `tokens` tokens."""
    reply = ReconstructionPrompt.from_tokenizer(tokenizer).reply  # the turn change up to the reply
    text = "\n\n".join(topics[name] for name in sorted(topics))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text[:30 * tokens]}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    if ids[-len(reply):] != reply or len(ids) < tokens:
        raise ValueError(f"the prompt has {len(ids)} tokens and does not end with the reply header")
    return torch.tensor([ids[:tokens - len(reply)] + reply])


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.2)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, tokenizer = load_model("smollm2", progress=False)
    ids = prompt_ids(tokenizer, args.tokens)

    def plain():
        model(ids, cache=PrunedCache(None), use_cache=True, logits_to_keep=1)

    def kvzip():
        PrunedCache(KVzip(budget=args.budget)).prefill(model, ids, tokenizer=tokenizer, logits_to_keep=1)

    model(ids[:, :64], cache=PrunedCache(None), use_cache=True, logits_to_keep=1)  # warm-up
    PrunedCache(KVzip(budget=args.budget)).prefill(model, ids[:, :64], tokenizer=tokenizer, logits_to_keep=1)
    print(f"KVzip(budget={args.budget}) prefill against a plain prefill, SmolLM2-135M-Instruct fp32, "
          f"{ids.shape[1]} tokens, {torch.get_num_threads()} thread(s), commit {commit()}")
    print("| run | plain prefill s | load | KVzip prefill s | load | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    times = {"plain": [], "kvzip": []}
    for run in range(args.runs):
        loads = {}
        for name, prefill in (("plain", plain), ("kvzip", kvzip)) if run % 2 == 0 else (("kvzip", kvzip),
                                                                                          ("plain", plain)):
            began = time.perf_counter()
            prefill()
            times[name].append(time.perf_counter() - began)
            loads[name] = os.getloadavg()[0]
        print(f"| {run + 1} | {times['plain'][-1]:.2f} | {loads['plain']:.2f} | {times['kvzip'][-1]:.2f} | "
              f"{loads['kvzip']:.2f} | {times['kvzip'][-1] / times['plain'][-1]:.2f}x |", flush=True)
    plain_s, kvzip_s = statistics.median(times["plain"]), statistics.median(times["kvzip"])
    print(f"| median | {plain_s:.2f} | | {kvzip_s:.2f} | | {kvzip_s / plain_s:.2f}x |")
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
