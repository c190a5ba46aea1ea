"""Fixed retrieval prompts for end-to-end checks on the real SmolLM2 model.

Each case hides one fact (a passcode, a name, a city) in about 1.5k tokens of real text: sections of
the Python language reference that ship with CPython (`pydoc_data.topics`). The question comes after
the text, so a policy that evicts the fact cannot answer.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pydoc_data.topics import topics

import torch


@dataclass(frozen=True)
class RetrievalCase:
    fact: str
    question: str
    answer: str
    topics: tuple[str, ...]
    depth: float  # where the fact sits in the text, 0 = start, 1 = end


RETRIEVAL_CASES = (
    RetrievalCase("The secret passcode is 48213.", "What is the secret passcode?", "48213",
                  ("for", "while", "if", "try"), 0.3),
    RetrievalCase("The name of the lighthouse keeper is Marigold.", "What is the name of the lighthouse keeper?",
                  "Marigold", ("class", "function", "lambda"), 0.5),
    RetrievalCase("The treasure is buried in the city of Valparaiso.", "In which city is the treasure buried?",
                  "Valparaiso", ("assert", "assignment", "augassign", "break", "continue"), 0.2),
    RetrievalCase("The access code for the vault is 90417.", "What is the access code for the vault?", "90417",
                  ("import", "global", "nonlocal", "del"), 0.7),
    RetrievalCase("The captain's parrot is called Pistachio.", "What is the captain's parrot called?",
                  "Pistachio", ("with", "return", "raise", "pass"), 0.6),
    RetrievalCase("The password to the archive is tangerine.", "What is the password to the archive?",
                  "tangerine", ("booleans", "comparisons", "binary", "bitwise"), 0.4),
)

TARGET_TOKENS = 1500


def real_text(topic_names, tokenizer, tokens: int, insert: str | None = None, depth: float = 0.5) -> str:
    """About `tokens` tokens of language-reference paragraphs, with `insert` placed at `depth`
    (paragraph granularity)."""
    paragraphs = [p.strip() for name in topic_names for p in topics[name].split("\n\n") if p.strip()]
    text, kept = [], 0
    for paragraph in paragraphs:
        size = len(tokenizer(paragraph, add_special_tokens=False).input_ids)
        if kept + size > tokens:
            break
        text.append(paragraph)
        kept += size
    if insert is not None:
        text.insert(max(1, round(len(text) * depth)), insert)
    return "\n\n".join(text)


def build_prompt(case: RetrievalCase, tokenizer, target_tokens: int = TARGET_TOKENS, with_fact: bool = True) -> list[int]:
    """Chat-formatted token ids: real text of about `target_tokens` tokens with the fact inserted at
    `case.depth` (left out with `with_fact=False`: what the model answers without it), then the question."""
    text = real_text(case.topics, tokenizer, target_tokens, case.fact if with_fact else None, case.depth)
    content = "Read the document and answer the question.\n\n" + text
    content += f"\n\nQuestion: {case.question} Answer in a few words."
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"]


def answers(model, tokenizer, make_cache, cases=RETRIEVAL_CASES, max_new_tokens: int = 12) -> list[bool]:
    """Greedy answers with a fresh cache per case (`make_cache()` -> Cache or None); True where the
    expected answer appears in the output."""
    results = []
    for case in cases:
        ids = torch.tensor([build_prompt(case, tokenizer)])
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, cache=make_cache(),
                             pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        results.append(case.answer.lower() in text.lower())
    return results


@torch.no_grad()
def answer_and_nll(model, tokenizer, cache, case: RetrievalCase, max_new_tokens: int = 12,
                   with_fact: bool = True) -> tuple[bool, float]:
    """One prefill of `case`'s prompt into `cache` (eviction included), then on one copy of the cache the
    greedy answer (True where the expected answer appears in it), and on another the mean negative
    log-likelihood of the expected answer's tokens, teacher-forced one decoding step at a time (the
    cache keeps evicting). The NLL measures how much of the fact survives even when the greedy answer
    misses it. `with_fact=False` asks the same question of the text without the fact."""
    ids = torch.tensor([build_prompt(case, tokenizer, with_fact=with_fact)])
    logits = model(ids, cache=cache, use_cache=True).logits[:, -1]
    forced = copy.deepcopy(cache)
    target = tokenizer(case.answer, add_special_tokens=False).input_ids
    nll, forced_logits = 0.0, logits
    for token in target:
        nll -= torch.log_softmax(forced_logits.float(), dim=-1)[0, token].item()
        forced_logits = model(torch.tensor([[token]]), cache=forced, use_cache=True).logits[:, -1]
    generated = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax(-1))
        if token == tokenizer.eos_token_id:
            break
        generated.append(token)
        logits = model(torch.tensor([[token]]), cache=cache, use_cache=True).logits[:, -1]
    text = tokenizer.decode(generated, skip_special_tokens=True)
    return case.answer.lower() in text.lower(), nll / max(1, len(target)) if math.isfinite(nll) else nll


def count_answered(model, tokenizer, make_cache, cases=RETRIEVAL_CASES) -> int:
    return sum(answers(model, tokenizer, make_cache, cases))


E2E_POLICIES = ("h2o", "snapkv", "tova", "knorm", "streamingllm", "random", "a2sf", "vatp(h2o)",
                "caote(h2o)", "graphkv(snapkv)", "pyramidkv(snapkv)", "adakv(snapkv)", "spatten")


def policy_configs() -> dict[str, str]:
    """`name@budget -> spec string` (kvpress.spec) of every configuration the end-to-end test records,
    at budgets 0.5 and 0.2; wrappers around the inner policy their paper uses; LazyLLM with its default
    schedule."""
    configs = {"full": "full"}
    for budget in (0.5, 0.2):
        configs.update({f"{name}@{budget}": f"{name}:budget={budget}" for name in E2E_POLICIES})
    configs["lazyllm"] = "lazyllm"  # its default schedule: a share of the computation, not of the cache
    return configs


E2E_CASES = RETRIEVAL_CASES[:3]
