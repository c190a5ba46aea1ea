"""Every policy of the library at budgets 0.5 and 0.2 on real-model tasks (SmolLM2-135M-Instruct, CPU).

Tasks, all on real text that ships with Python (`pydoc_data.topics`, the language reference):
- passkey: a pass key sentence hidden at depth 0.2 / 0.5 / 0.8 of ~400 tokens of text; answered if the
  greedy answer (12 tokens) contains the key;
- fact: a one-sentence fact inserted in a ~400-token document, then a question about it;
- agreement: the full cache's greedy continuation (48 tokens) of a request about a document is fed
  token by token to the pruned cache; the score is the share of steps whose argmax prediction equals
  the full cache's next token (teacher forcing, so one early mistake does not spoil the rest).

The 1.5k-token retrieval prompts of `tests/retrieval.py` are counted by `benchmarks/retrieval_counts.py`.

    OMP_NUM_THREADS=1 python benchmarks/policies.py [--workers 2]

Writes `benchmarks/RESULTS_policies.md`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from transformers import DynamicCache

from kvpress import load_model
from kvpress.spec import build_cache, parse_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from retrieval import real_text

BUDGETS = (0.5, 0.2)
DOC_TOKENS = 400
NEW_TOKENS = 48

# policy spec strings (kvpress.spec); each runs with `:budget=<b>` appended, "full" as is
POLICIES = ("full", "h2o", "a2sf", "snapkv", "tova", "knorm", "streamingllm", "random", "vatp(h2o)",
            "vatp(snapkv)", "caote(h2o)", "caote(snapkv)", "graphkv(snapkv)", "pyramidkv(snapkv)",
            "adakv(snapkv)", "spatten", "kvcompose", "kvcompose:structured=false", "pagedeviction")

PASSKEY = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_CASES = (("71432", ("for", "while", "if"), 0.2), ("50918", ("class", "function"), 0.5),
                 ("26874", ("import", "try"), 0.8))
FACT_CASES = (
    ("The oldest clock in the harbour museum was built by Ingrid Vasquez.",
     "Who built the oldest clock in the harbour museum?", "Ingrid", ("with", "raise", "return"), 0.4),
    ("The expedition's sled dog was named Juniper.", "What was the expedition's sled dog named?", "Juniper",
     ("assignment", "augassign", "global"), 0.6),
)
AGREEMENT_CASES = (("types", "typesseq", "typesseq-mutable", "typesmapping"),)


def document(names, tokenizer, insert: str | None = None, depth: float = 0.5) -> str:
    """About DOC_TOKENS tokens of pydoc topics, with `insert` placed at `depth`."""
    return real_text(names, tokenizer, DOC_TOKENS, insert, depth)


def chat(tokenizer, content: str) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    return torch.tensor([ids])


def build_tasks(tokenizer):
    passkey = []
    for key, names, depth in PASSKEY_CASES:
        text = document(names, tokenizer, PASSKEY.format(key=key), depth)
        content = ("There is a pass key hidden in the following text. Find it and remember it.\n\n" + text
                   + "\n\nWhat is the pass key? The pass key is")
        passkey.append((chat(tokenizer, content), key))
    fact = []
    for sentence, question, answer, names, depth in FACT_CASES:
        content = (f"Read the document and answer the question.\n\n{document(names, tokenizer, sentence, depth)}"
                   f"\n\nQuestion: {question} Answer in a few words.")
        fact.append((chat(tokenizer, content), answer))
    agreement = [chat(tokenizer, "Explain in plain words what this part of the Python documentation says.\n\n"
                      + document(names, tokenizer)) for names in AGREEMENT_CASES]
    return passkey, fact, agreement


@torch.no_grad()
def teacher_forced(model, ids: torch.Tensor, continuation: list[int] | None, cache, steps: int = NEW_TOKENS):
    """Greedy predictions at each step; with `continuation`, feed those tokens instead of the predictions.
    `cache=None` means the full cache (a `DynamicCache`, kept across the steps)."""
    cache = DynamicCache() if cache is None else cache
    out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    predictions = [int(out.logits[0, -1].argmax())]
    for step in range(steps - 1):
        token = continuation[step] if continuation is not None else predictions[-1]
        out = model(torch.tensor([[token]]), cache=cache, use_cache=True, logits_to_keep=1)
        predictions.append(int(out.logits[0, -1].argmax()))
    return predictions


def answered(model, tokenizer, ids, answer, cache, new_tokens: int = 12) -> bool:
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, cache=cache,
                         pad_token_id=tokenizer.pad_token_id)
    return answer.lower() in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).lower()


_worker: dict = {}


def _init(references):
    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2")
    _worker.update(model=model, tokenizer=tokenizer, tasks=build_tasks(tokenizer), references=references)


def make_cache(name: str, budget: float):
    """A fresh cache; None (a DynamicCache) for the full cache, the reference of every task."""
    if name == "full":
        return None
    return build_cache(parse_spec(f"{name}{',' if ':' in name else ':'}budget={budget}"))


def run_config(job):
    name, budget = job
    model, tokenizer = _worker["model"], _worker["tokenizer"]
    passkey, fact, agreement = _worker["tasks"]
    start = time.time()
    row = {
        "passkey": sum(answered(model, tokenizer, ids, key, make_cache(name, budget)) for ids, key in passkey)
        / len(passkey),
        "fact": sum(answered(model, tokenizer, ids, answer, make_cache(name, budget)) for ids, answer in fact)
        / len(fact),
    }
    matches = 0
    for ids, reference in zip(agreement, _worker["references"]):
        predictions = teacher_forced(model, ids, reference, make_cache(name, budget))
        matches += sum(p == r for p, r in zip(predictions, reference))
    row["agreement"] = matches / (NEW_TOKENS * len(agreement))
    row["seconds"] = time.time() - start
    return name, budget, row


def table(results, names) -> list[str]:
    lines = ["| policy | " + " | ".join(f"{task} @{b}" for b in BUDGETS for task in ("passkey", "fact", "agree"))
             + " | mean @0.5 | mean @0.2 |",
             "| --- |" + " ---: |" * (3 * len(BUDGETS) + 2)]
    for name in names:
        cells, means = [], []
        for budget in BUDGETS:
            row = results[(name, budget)]
            cells += [f"{row['passkey']:.2f}", f"{row['fact']:.2f}", f"{row['agreement']:.3f}"]
            means.append((row["passkey"] + row["fact"] + row["agreement"]) / 3)
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return lines


CLAIMS = (("A2SF above H2O", "a2sf", "h2o"), ("VATP above H2O", "vatp(h2o)", "h2o"),
          ("VATP above SnapKV", "vatp(snapkv)", "snapkv"), ("GraphKV above SnapKV", "graphkv(snapkv)", "snapkv"),
          ("CAOTE above H2O", "caote(h2o)", "h2o"), ("CAOTE above SnapKV", "caote(snapkv)", "snapkv"),
          ("KVCompose above SnapKV (same total slots)", "kvcompose", "snapkv"),
          ("KVCompose unstructured above SnapKV", "kvcompose:structured=false", "snapkv"))


def claims(results) -> list[str]:
    def mean(name, budget):
        row = results[(name, budget)]
        return (row["passkey"] + row["fact"] + row["agreement"]) / 3

    lines = ["| claim | " + " | ".join(f"@{b} (mean, agreement)" for b in BUDGETS) + " | holds |",
             "| --- |" + " --- |" * len(BUDGETS) + " --- |"]
    for label, ours, base in CLAIMS:
        if (ours, BUDGETS[0]) not in results or (base, BUDGETS[0]) not in results:
            continue
        cells, wins = [], 0
        for budget in BUDGETS:
            a, b = mean(ours, budget), mean(base, budget)
            agree_a, agree_b = results[(ours, budget)]["agreement"], results[(base, budget)]["agreement"]
            cells.append(f"{a:.3f} vs {b:.3f}, {agree_a:.3f} vs {agree_b:.3f}")
            wins += a > b
        verdict = "yes" if wins == len(BUDGETS) else ("no" if wins == 0 else "mixed")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {verdict} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS_policies.md"))
    parser.add_argument("--policies", default=None,
                        help="semicolon-separated subset of the policies to run (default: all)")
    args = parser.parse_args()
    names = POLICIES if args.policies is None else tuple(args.policies.split(";"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    start = time.time()
    model, tokenizer = load_model("smollm2")
    _, _, agreement = build_tasks(tokenizer)
    references = [teacher_forced(model, ids, None, None) for ids in agreement]
    jobs = [(name, budget) for name in names for budget in BUDGETS]
    with ProcessPoolExecutor(args.workers, initializer=_init, initargs=(references,)) as pool:
        results = {}
        for name, budget, row in pool.map(run_config, jobs):
            results[(name, budget)] = row
            print(f"{name:>18} @{budget}: {row}", flush=True)
    minutes = (time.time() - start) / 60
    lines = ["## Policies on real-model tasks (issue 6)", "",
             f"Command: `OMP_NUM_THREADS=1 python benchmarks/policies.py --workers {args.workers}"
             + (f" --policies '{args.policies}'" if args.policies else "") + "` "
             f"({minutes:.1f} min on {args.workers} CPU cores).",
             (f"SmolLM2-135M-Instruct, fp32, CPU, slack 0; prompts of ~{DOC_TOKENS} tokens of `pydoc_data.topics` text; "
             f"policy defaults except the budget (fraction of tokens kept per KV head and layer). "
             f"passkey, fact: share of {len(PASSKEY_CASES)} / {len(FACT_CASES)} prompts answered; agree: share of "
             f"{NEW_TOKENS * len(AGREEMENT_CASES)} teacher-forced steps whose argmax equals the full cache's; mean "
             "of the three."), "", *table(results, names), "", "### Paper claims on this benchmark", "", *claims(results)]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
