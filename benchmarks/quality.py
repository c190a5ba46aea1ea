"""Quality at high compression on longer real text (issue 15): every policy at budgets 0.5 and 0.2, with
decode-time eviction and prefill-only compression, on prompts of 1.5k-2k tokens (SmolLM2-135M-Instruct).

Tasks, each on `--prompts` prompts (12 by default) built from `pydoc_data.topics` (the Python language
reference that ships with CPython), about `--doc-tokens` tokens of text each, chat-formatted:
- passkey: "The secret passcode is NNNNN." (a random 5-digit key) at a random depth, then the question
  (the wording of `tests/retrieval.py`; SmolLM2 answers the "pass key" wording of
  `benchmarks/policies.py` with an explanation of Python's `pass` at this length, 0 of 4 with the full
  cache); answered if the greedy answer (12 tokens) contains the key;
- needle: a one-sentence fact (a made-up name) at a random depth, then a question; answered if the
  greedy answer (12 tokens) contains the name;
- agreement: "Summarize ..." a document; the full cache's greedy summary (48 tokens) is fed token by
  token to the pruned cache; the score is the share of steps whose argmax equals the full cache's next
  token (teacher forcing).

The whole prompt is compressed at prefill (question included). Each prompt is prefilled once per
(policy, budget); the cache is then copied and answers in two modes: `decode` (slack 0: the layer is
cut back to its budget at every step) and `prefill` (slack 64, larger than any generation here, so only
the prompt is compressed). KVzip prefills with `kvzip_prefill` (context reconstruction); its prefill
time relative to a plain prefill is printed.

    OMP_NUM_THREADS=1 python benchmarks/quality.py [--quick] [--workers 2] [--shard 0/2] [--policies h2o,tova]
    python benchmarks/quality.py --report results.jsonl [more.jsonl ...]
    OMP_NUM_THREADS=1 python benchmarks/quality.py --quick --kvzip-cost

Results are appended per (policy, budget) to `--out` (JSONL, a rerun skips what is there); the table is
printed from every JSONL given to `--report` (or the one just written).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from pydoc_data.topics import topics

import torch
from transformers import DynamicCache

from kvpress import load_model
from kvpress.spec import build_cache, parse_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from retrieval import real_text

BUDGETS = (0.5, 0.2)
MODES = (("decode", 0), ("prefill", 64))
ANSWER_TOKENS = 12
SUMMARY_TOKENS = 48

# every registered policy; wrappers around the inner policy their paper uses, Span around the three
# accumulated/last-row scorers the issue names
POLICIES = ("h2o", "a2sf", "tova", "snapkv", "knorm", "streamingllm", "random", "expectedattention", "kvzip",
            "span(h2o)", "span(tova)", "span(a2sf)", "vatp(h2o)", "caote(h2o)", "graphkv(snapkv)",
            "pyramidkv(snapkv)", "adakv(snapkv)", "adakv(expectedattention)", "spatten",
            "quantizedpruning(snapkv)")
EXTRA_PARAMS = {"quantizedpruning(snapkv)": ",bits=8"}

NAMES = ("Ingrid Vasquez", "Juniper", "Marigold", "Pistachio", "Valparaiso", "Tamsin Oyelaran", "Bartholomew",
         "Quillon", "Saffron Achebe", "Montevideo", "Lorcan Whitfield", "Zanzibar", "Odalys Ferreira", "Corvina",
         "Helsingor", "Perpetua Nakamura")
NEEDLES = (("The oldest clock in the harbour museum was built by {name}.",
            "Who built the oldest clock in the harbour museum?"),
           ("The expedition's sled dog was named {name}.", "What was the expedition's sled dog named?"),
           ("The lighthouse keeper's daughter is called {name}.", "What is the lighthouse keeper's daughter called?"),
           ("The treasure map was drawn by {name}.", "Who drew the treasure map?"))


def documents(tokenizer, count: int, tokens: int, seed: int) -> list[list[str]]:
    """`count` groups of topic names, each with at least `tokens` tokens of text, drawn without
    replacement from a seeded shuffle of the language reference's topics (cycled when exhausted)."""
    names = sorted(topics)
    random.Random(seed).shuffle(names)
    sizes = {}
    groups, group, size, index = [], [], 0, 0
    while len(groups) < count:
        name = names[index % len(names)]
        index += 1
        if name not in sizes:
            sizes[name] = len(tokenizer(topics[name], add_special_tokens=False).input_ids)
        group.append(name)
        size += sizes[name]
        if size >= tokens:
            groups.append(group)
            group, size = [], 0
    return groups


def chat(tokenizer, content: str) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    return torch.tensor([ids])


def build_tasks(tokenizer, prompts: int, doc_tokens: int) -> dict[str, list[tuple[torch.Tensor, str]]]:
    """`{task: [(ids [1, T], answer)]}`; the answer of an agreement prompt is empty (its reference is the
    full cache's summary)."""
    rng = random.Random(15)
    tasks = {"passkey": [], "needle": [], "agreement": []}
    for i, names in enumerate(documents(tokenizer, prompts, doc_tokens, seed=1)):
        key = f"{rng.randrange(10000, 100000)}"
        text = real_text(names, tokenizer, doc_tokens, f"The secret passcode is {key}.", rng.uniform(0.1, 0.9))
        content = (f"Read the document and answer the question.\n\n{text}\n\nQuestion: What is the secret "
                   "passcode? Answer in a few words.")
        tasks["passkey"].append((chat(tokenizer, content), key))
    for i, names in enumerate(documents(tokenizer, prompts, doc_tokens, seed=2)):
        name = NAMES[i % len(NAMES)]
        sentence, question = NEEDLES[i % len(NEEDLES)]
        text = real_text(names, tokenizer, doc_tokens, sentence.format(name=name), rng.uniform(0.1, 0.9))
        content = (f"Read the document and answer the question.\n\n{text}\n\nQuestion: {question} "
                   "Answer in a few words.")
        tasks["needle"].append((chat(tokenizer, content), name.split()[0]))
    for names in documents(tokenizer, prompts, doc_tokens, seed=3):
        content = ("Summarize what this part of the Python documentation says, in plain words.\n\n"
                   + real_text(names, tokenizer, doc_tokens))
        tasks["agreement"].append((chat(tokenizer, content), ""))
    return tasks


def spec_of(name: str, budget: float) -> str:
    """`name` may carry parameters of its own: `expectedattention:window=32`."""
    return f"{name}{',' if ':' in name else ':'}budget={budget}{EXTRA_PARAMS.get(name, '')}"


@torch.no_grad()
def prefill(model, tokenizer, ids, cache) -> torch.Tensor:
    """The prompt into `cache` (KVzip: with context reconstruction); returns the last logits `[V]`."""
    if any(type(p).__name__ == "KVzip" for p in getattr(cache, "chain", ())):
        from kvpress.policies.kvzip import kvzip_prefill

        return kvzip_prefill(model, ids, cache, tokenizer)[0, -1]
    return model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]


@torch.no_grad()
def greedy(model, cache, logits, steps: int, eos: int, forced: list[int] | None = None) -> list[int]:
    """Argmax predictions of `steps` steps from `logits`; with `forced`, those tokens are fed instead."""
    predictions = [int(logits.argmax())]
    for step in range(steps - 1):
        token = forced[step] if forced is not None else predictions[-1]
        if forced is None and token == eos:
            break
        logits = model(torch.tensor([[token]]), cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        predictions.append(int(logits.argmax()))
    return predictions


_worker: dict = {}


def _init(prompts, doc_tokens, references):
    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2")
    _worker.update(model=model, tokenizer=tokenizer, tasks=build_tasks(tokenizer, prompts, doc_tokens),
                   references=references)


def run_job(job) -> dict:
    """One (policy, budget), or `{"error": ...}` when it fails (the other jobs go on)."""
    try:
        return measure(job)
    except Exception as error:  # noqa: BLE001 - reported by main, never written as a result
        return {"policy": job[0], "budget": job[1], "error": repr(error)}


def measure(job) -> dict:
    """One (policy, budget): every prompt of every task, prefilled once, answered in both modes."""
    name, budget = job
    model, tokenizer, tasks = _worker["model"], _worker["tokenizer"], _worker["tasks"]
    eos = tokenizer.eos_token_id
    row = {"policy": name, "budget": budget, "prefill_s": 0.0, "prompts": len(tasks["passkey"])}
    counts = {f"{task}:{mode}": 0.0 for task in tasks for mode, _ in MODES}
    start = time.time()
    for task, items in tasks.items():
        for index, (ids, answer) in enumerate(items):
            cache = DynamicCache() if name == "full" else build_cache(parse_spec(spec_of(name, budget)))
            began = time.time()
            logits = prefill(model, tokenizer, ids, cache)
            row["prefill_s"] += time.time() - began
            for mode, slack in MODES:
                run = cache
                if name != "full":
                    run = copy.deepcopy(cache)
                    run.slack = slack
                if task == "agreement":
                    reference = _worker["references"][index]
                    predicted = greedy(model, run, logits, SUMMARY_TOKENS, eos, forced=reference)
                    counts[f"{task}:{mode}"] += sum(p == r for p, r in zip(predicted, reference)) / len(reference)
                else:
                    text = tokenizer.decode(greedy(model, run, logits, ANSWER_TOKENS, eos), skip_special_tokens=True)
                    counts[f"{task}:{mode}"] += answer.lower() in text.lower()
                if name == "full":
                    break  # the full cache does not depend on the mode
            if name == "full":
                for key in [k for k in counts if k.startswith(task) and not k.endswith("decode")]:
                    counts[key] = counts[f"{task}:decode"]
    row.update(counts)
    row["seconds"] = time.time() - start
    return row


@torch.no_grad()
def references(model, tokenizer, tasks) -> list[list[int]]:
    """The full cache's greedy summary of each agreement prompt (`SUMMARY_TOKENS` tokens, not stopped at
    end of sequence so every prompt counts the same number of steps)."""
    out = []
    for ids, _ in tasks["agreement"]:
        cache = DynamicCache()
        logits = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        out.append(greedy(model, cache, logits, SUMMARY_TOKENS, eos=-1))
    return out


@torch.no_grad()
def kvzip_cost(model, tokenizer, tasks, budget: float = 0.2) -> list[str]:
    """Seconds of a plain prefill (`PrunedCache(None)`) and of `kvzip_prefill`, back to back on the
    first prompt of each task (one untimed warm-up), and their ratio."""
    from kvpress import PrunedCache
    from kvpress.policies import KVzip, kvzip_prefill

    lines = ["| prompt | tokens | plain prefill s | kvzip_prefill s | ratio |", "| --- | ---: | ---: | ---: | ---: |"]
    model(tasks["passkey"][0][0][:, :64], cache=PrunedCache(None))
    for task, items in tasks.items():
        ids = items[0][0]
        began = time.time()
        model(ids, cache=PrunedCache(None), use_cache=True, logits_to_keep=1)
        plain = time.time() - began
        began = time.time()
        kvzip_prefill(model, ids, PrunedCache(KVzip(budget=budget)), tokenizer)
        zipped = time.time() - began
        lines.append(f"| {task} 0 | {ids.shape[1]} | {plain:.1f} | {zipped:.1f} | {zipped / plain:.2f}x |")
    return lines


def table(rows: list[dict]) -> list[str]:
    """One markdown table: a row per policy, columns per budget, mode and task (counts out of the number
    of prompts, agreement as a mean share)."""
    by_key = {(r["policy"], r["budget"]): r for r in rows}
    full = next((r for r in rows if r["policy"] == "full"), None)
    policies = [p for p in dict.fromkeys(r["policy"] for r in rows) if p != "full"]
    budgets = [b for b in BUDGETS if any(r["budget"] == b for r in rows)]
    head = ["policy"] + [f"{task} {mode} @{b}" for b in budgets for mode, _ in MODES
                         for task in ("passkey", "needle", "agree")]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    if full is not None:
        n = full["prompts"]
        cells = [f"{full['passkey:decode']:.0f}/{n}", f"{full['needle:decode']:.0f}/{n}", "1.000"] * (
            len(MODES) * len(budgets))
        lines.append("| full | " + " | ".join(cells) + " |")
    for policy in policies:
        cells = []
        for budget in budgets:
            row = by_key.get((policy, budget))
            for mode, _ in MODES:
                if row is None:
                    cells += ["", "", ""]
                    continue
                n = row["prompts"]
                cells += [f"{row[f'passkey:{mode}']:.0f}/{n}", f"{row[f'needle:{mode}']:.0f}/{n}",
                          f"{row[f'agreement:{mode}'] / n:.3f}"]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return lines


def read_rows(paths) -> list[dict]:
    rows = {}
    for path in paths:
        if Path(path).exists():
            for line in Path(path).read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    rows[(row["policy"], row["budget"])] = row
    return list(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th job starting at i")
    parser.add_argument("--quick", action="store_true", help="4 prompts per task instead of 12")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per task (default 12, --quick 4)")
    parser.add_argument("--doc-tokens", type=int, default=1700)
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated spec names")
    parser.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "quality.jsonl"))
    parser.add_argument("--report", nargs="*", help="print the table of these JSONL files and exit")
    parser.add_argument("--kvzip-cost", action="store_true",
                        help="time kvzip_prefill against a plain prefill (first prompt of each task) and exit")
    args = parser.parse_args()
    if args.report is not None:
        print("\n".join(table(read_rows(args.report or [args.out]))))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    prompts = args.prompts or (4 if args.quick else 12)
    shard, shards = (int(x) for x in args.shard.split("/"))
    policies = ["full"] + [p for p in args.policies.split(",") if p]
    jobs = [(p, float(b)) for b in args.budgets.split(",") for p in policies]  # budget-major: --budgets 0.2,0.5
    jobs = [job for job in dict.fromkeys((p, b if p != "full" else 1.0) for p, b in jobs)]
    done = {(r["policy"], r["budget"]) for r in read_rows([args.out])}
    jobs = [job for i, job in enumerate(jobs) if i % shards == shard and job not in done]
    model, tokenizer = load_model("smollm2")
    tasks = build_tasks(tokenizer, prompts, args.doc_tokens)
    if args.kvzip_cost:
        print("\n".join(kvzip_cost(model, tokenizer, tasks)))
        return
    lengths = [ids.shape[1] for items in tasks.values() for ids, _ in items]
    print(f"{prompts} prompts per task, {min(lengths)}-{max(lengths)} tokens; {len(jobs)} jobs", flush=True)
    saved = Path(args.out).with_suffix(f".references-{prompts}x{args.doc_tokens}.json")
    refs = json.loads(saved.read_text()) if saved.exists() else references(model, tokenizer, tasks)
    saved.write_text(json.dumps(refs))
    del model
    with ProcessPoolExecutor(args.workers, initializer=_init, initargs=(prompts, args.doc_tokens, refs)) as pool:
        for row in pool.map(run_job, jobs):
            if "error" in row:
                print(f"FAILED {row}", flush=True)
                continue
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print("\n".join(table(read_rows([args.out]))))


if __name__ == "__main__":
    main()
