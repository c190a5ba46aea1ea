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

The whole prompt is compressed at prefill (question included), then the answer is decoded in two
modes, each on its own copy of the compressed cache: `decode` (slack 0: the layer is cut back to its
budget at every step; the summary is fed one token at a time) and `prefill` (slack 64, larger than
any generation here, so only the prompt is compressed; the summary is fed in one forward, which
evicts nothing either).

Each prompt is prefilled once for real, recording what every layer's attention received; every
(policy, budget) then gets that prefill replayed into its own cache layer by layer (`replay`): a
policy evicts after a layer's attention, so in a one-forward prefill the queries, keys, values and
last logits do not depend on the policy, and the replay leaves the cache as a real prefill would
while skipping the projections and MLPs. KVzip, which scores with extra forwards, prefills with
`kvzip_prefill` (its cost relative to a plain prefill: `--kvzip-cost`).

    OMP_NUM_THREADS=1 python benchmarks/quality.py [--quick] [--shard 0/2] [--policies h2o,tova] [--budgets 0.2]
    python benchmarks/quality.py --report results.jsonl [more.jsonl ...]
    OMP_NUM_THREADS=1 python benchmarks/quality.py --quick --kvzip-cost

Results are appended per (policy, budget, task, prompt) to `--out` (JSONL, flushed as produced; a
rerun skips what is there; `--shard i/n` processes split the prompts); the table is printed from
every JSONL given to `--report` (or the one just written).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from pydoc_data.topics import topics

import torch
from transformers import DynamicCache

from kvpress import PrunedCache, PrunedLayer, hook, load_model
from kvpress.policies import KVzip
from kvpress.spec import build_cache, parse_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from retrieval import real_text

BUDGETS = (0.5, 0.2)
MODES = (("decode", 0), ("prefill", 64))
ANSWER_TOKENS = 12
SUMMARY_TOKENS = 48

# every registered policy but LazyLLM (it bounds computation, not the cache: no budget to compare at);
# wrappers around the inner policy their paper uses, Span around the three
# accumulated/last-row scorers the issue names
POLICIES = ("h2o", "a2sf", "tova", "snapkv", "knorm", "streamingllm", "random", "expectedattention", "kvzip",
            "span(h2o)", "span(tova)", "span(a2sf)", "vatp(h2o)", "caote(h2o)", "graphkv(snapkv)",
            "pyramidkv(snapkv)", "adakv(snapkv)", "adakv(expectedattention)", "spatten", "kvcompose",
            "pagedeviction", "quantizedpruning(snapkv):memory=budget")
# QuantizedPruning at the memory the budget's slots take in the model's precision (`memory=budget`,
# computed per prompt): at 8 bits in an fp32 model it keeps about 2.8x the slots (scales, zero points
# and the full-precision tail take the rest of the ideal 4x)
EXTRA_PARAMS = {"quantizedpruning(snapkv):memory=budget": ",bits=8"}

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


def spec_of(name: str, budget: float, model=None, tokens: int = 0) -> str:
    """`name` may carry parameters of its own: `expectedattention:window=32`; `memory=budget` becomes the
    bytes that `budget` of `tokens` take in `model`'s keys and values at its precision."""
    spec = f"{name}{',' if ':' in name else ':'}budget={budget}{EXTRA_PARAMS.get(name, '')}"
    if "memory=budget" in spec:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * model.dtype.itemsize
        spec = spec.replace("memory=budget", f"memory={int(budget * tokens * per_token)}")
    return spec


@contextmanager
def recording(calls: list[dict]):
    """Record what every pruned layer's `update` and `attend` receive during one forward."""
    update, attend = PrunedLayer.update, PrunedLayer.attend

    def record_update(self, key, value, *args, **kwargs):
        calls.append({"layer": self.layer_idx, "key": key, "value": value, "update": (args, kwargs)})
        return update(self, key, value, *args, **kwargs)

    def record_attend(self, original, module, query, key, value, mask, *args, **kwargs):
        calls[-1].update(original=original, module=module, query=query, mask=mask, args=args, kwargs=kwargs)
        return attend(self, original, module, query, key, value, mask, *args, **kwargs)

    PrunedLayer.update, PrunedLayer.attend = record_update, record_attend
    try:
        yield
    finally:
        PrunedLayer.update, PrunedLayer.attend = update, attend


@torch.no_grad()
def record_prefill(model, ids) -> tuple[torch.Tensor, list[dict]]:
    """One real prefill of `ids` (no eviction): its last logits `[V]` and what each layer's attention saw."""
    calls: list[dict] = []
    with recording(calls):
        logits = model(ids, cache=PrunedCache(None), use_cache=True, logits_to_keep=1).logits[0, -1]
    return logits, calls


@torch.no_grad()
def replay(calls: list[dict], cache) -> None:
    """Feed a recorded prefill into `cache` layer by layer, as the model's forward would: a policy evicts
    after a layer's attention, so in a one-forward prefill the hidden states, the queries, keys and
    values of every layer and the last logits do not depend on the policy; only what the cache keeps
    does. Saves the projections and MLPs of a prefill per policy."""
    for call in calls:
        args, kwargs = call["update"]
        keys, values = cache.update(call["key"], call["value"], call["layer"], *args, **kwargs)
        handoff = hook.take_handoff(keys)
        handoff.layer.attend(call["original"], call["module"], call["query"], keys, values, call["mask"],
                             *call["args"], **call["kwargs"])


@torch.no_grad()
def greedy(model, cache, logits, steps: int, eos: int) -> list[int]:
    """Argmax predictions of `steps` steps from `logits` (stopped at end of sequence)."""
    predictions = [int(logits.argmax())]
    for _ in range(steps - 1):
        if predictions[-1] == eos:
            break
        logits = model(torch.tensor([[predictions[-1]]]), cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        predictions.append(int(logits.argmax()))
    return predictions


@torch.no_grad()
def agreement(model, cache, logits, reference: list[int], one_step_at_a_time: bool) -> float:
    """Share of the reference summary's steps whose argmax equals the reference token, the reference fed
    token by token (decode-time eviction acts between steps) or in one forward (prefill-only compression:
    with a slack above the summary's length nothing is evicted between its tokens either way)."""
    forced = torch.tensor([reference[:-1]])
    if one_step_at_a_time:
        predicted = [int(logits.argmax())]
        for token in forced[0]:
            step = model(token.view(1, 1), cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
            predicted.append(int(step.argmax()))
    else:
        rest = model(forced, cache=cache, use_cache=True).logits[0].argmax(-1).tolist()
        predicted = [int(logits.argmax())] + rest
    return sum(p == r for p, r in zip(predicted, reference)) / len(reference)


def measure(model, tokenizer, task: str, ids, answer: str, reference, logits, calls, name: str, budget: float) -> dict:
    """One prompt under one (policy, budget), in both modes."""
    began = time.time()
    if name == "full":
        cache = PrunedCache(None)
        replay(calls, cache)
    else:
        cache = build_cache(parse_spec(spec_of(name, budget, model, ids.shape[1])))
        if cache.prefill_owner is not None:  # KVzip: scored by reconstruction forwards, no replay
            logits = cache.prefill(model, ids, tokenizer=tokenizer, logits_to_keep=1)[0, -1]
        else:
            replay(calls, cache)
            cache.end_prefill()  # the prompt ends here: a cross-layer allocation (KVCompose) compresses now,
            # not at the first one-token forward, which the prefill mode's one-forward summary never makes
    row = {"policy": name, "budget": budget if name != "full" else 1.0, "task": task,
           "prefill_s": round(time.time() - began, 2)}
    for mode, slack in MODES:
        run = copy.deepcopy(cache)
        run.slack = slack
        if task == "agreement":
            row[mode] = agreement(model, run, logits, reference, one_step_at_a_time=(mode == "decode"))
        else:
            text = tokenizer.decode(greedy(model, run, logits, ANSWER_TOKENS, tokenizer.eos_token_id),
                                    skip_special_tokens=True)
            row[mode] = float(answer.lower() in text.lower())
    row["seconds"] = round(time.time() - began, 2)
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
    first prompt of each task (one untimed warm-up), and their ratio; both compute the last logits only.
    Three alternated runs with medians at 2k tokens: benchmarks/kvzip_cost.py."""
    lines = ["| prompt | tokens | plain prefill s | kvzip_prefill s | ratio |", "| --- | ---: | ---: | ---: | ---: |"]
    model(tasks["passkey"][0][0][:, :64], cache=PrunedCache(None))
    for task, items in tasks.items():
        ids = items[0][0]
        began = time.time()
        model(ids, cache=PrunedCache(None), use_cache=True, logits_to_keep=1)
        plain = time.time() - began
        began = time.time()
        PrunedCache(KVzip(budget=budget)).prefill(model, ids, tokenizer=tokenizer, logits_to_keep=1)
        zipped = time.time() - began
        lines.append(f"| {task} 0 | {ids.shape[1]} | {plain:.1f} | {zipped:.1f} | {zipped / plain:.2f}x |")
    return lines


def aggregate(rows: list[dict]) -> dict:
    """`{(policy, budget): {"passkey:decode": count, ..., "agreement:prefill": mean, "n:passkey": prompts}}`."""
    out: dict = {}
    for row in rows:
        cell = out.setdefault((row["policy"], row["budget"]), {})
        task = row["task"]
        cell[f"n:{task}"] = cell.get(f"n:{task}", 0) + 1
        for mode, _ in MODES:
            cell[f"{task}:{mode}"] = cell.get(f"{task}:{mode}", 0.0) + row[mode]
    for cell in out.values():
        for mode, _ in MODES:
            if cell.get("n:agreement"):
                cell[f"agreement:{mode}"] /= cell["n:agreement"]
    return out


def table(rows: list[dict]) -> list[str]:
    """One markdown table: a row per policy, columns per budget, mode and task (answers out of the
    prompts measured, agreement as a mean share)."""
    cells_by_key = aggregate(rows)
    policies = [p for p in dict.fromkeys(r["policy"] for r in rows) if p != "full"]
    budgets = [b for b in BUDGETS if any(r["budget"] == b for r in rows)]
    head = ["policy"] + [f"{task} {mode} @{b}" for b in budgets for mode, _ in MODES
                         for task in ("passkey", "needle", "agree")]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]

    def cells(cell, mode):
        if cell is None:
            return ["", "", ""]
        return [f"{cell.get(f'passkey:{mode}', 0):.0f}/{cell.get('n:passkey', 0)}",
                f"{cell.get(f'needle:{mode}', 0):.0f}/{cell.get('n:needle', 0)}",
                f"{cell[f'agreement:{mode}']:.3f}" if cell.get("n:agreement") else ""]

    full = cells_by_key.get(("full", 1.0))
    if full is not None:
        lines.append("| full | " + " | ".join(cells(full, "decode") * (len(MODES) * len(budgets))) + " |")
    for policy in policies:
        row = []
        for budget in budgets:
            for mode, _ in MODES:
                row += cells(cells_by_key.get((policy, budget)), mode)
        lines.append(f"| {policy} | " + " | ".join(row) + " |")
    return lines


def read_rows(paths) -> list[dict]:
    """Rows of every JSONL in `paths`, one per (policy, budget, task, prompt); the last wins."""
    rows = {}
    for path in paths:
        if Path(path).exists():
            for line in Path(path).read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    rows[(row["policy"], row["budget"], row["task"], row["prompt"])] = row
    return list(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", default="0/1", help="i/n: this process measures every n-th prompt from i")
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
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    prompts = args.prompts or (4 if args.quick else 12)
    shard, shards = (int(x) for x in args.shard.split("/"))
    model, tokenizer = load_model("smollm2")
    tasks = build_tasks(tokenizer, prompts, args.doc_tokens)
    if args.kvzip_cost:
        print("\n".join(kvzip_cost(model, tokenizer, tasks)))
        return
    jobs = [("full", 1.0)] + [(p, float(b)) for b in args.budgets.split(",") for p in args.policies.split(",") if p]
    lengths = [ids.shape[1] for items in tasks.values() for ids, _ in items]
    print(f"{prompts} prompts per task, {min(lengths)}-{max(lengths)} tokens; {len(jobs)} (policy, budget) "
          f"pairs; shard {shard}/{shards}", flush=True)
    saved = Path(args.out).with_suffix(f".references-{prompts}x{args.doc_tokens}.json")
    refs = json.loads(saved.read_text()) if saved.exists() else references(model, tokenizer, tasks)
    saved.write_text(json.dumps(refs))
    done = {(r["policy"], r["budget"], r["task"], r["prompt"]) for r in read_rows([args.out])}
    # prompt-major (passkey 0, needle 0, agreement 0, passkey 1, ...): a partial run covers every task alike
    items = [(task, index, *tasks[task][index]) for index in range(prompts) for task in tasks]
    for position, (task, index, ids, answer) in enumerate(items):
        if position % shards != shard:
            continue
        todo = [(name, budget) for name, budget in jobs if (name, budget, task, index) not in done]
        if not todo:
            continue
        logits, calls = record_prefill(model, ids)
        reference = refs[index] if task == "agreement" else None
        for name, budget in todo:
            try:
                row = measure(model, tokenizer, task, ids, answer, reference, logits, calls, name, budget)
            except Exception as error:  # noqa: BLE001 - reported, never written as a result; the others go on
                print(f"FAILED {name}@{budget} {task} {index}: {error!r}", flush=True)
                continue
            row["prompt"] = index
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        print(f"{task} {index}: {len(todo)} (policy, budget) pairs measured", flush=True)
    print("\n".join(table(read_rows([args.out]))))


if __name__ == "__main__":
    main()
