"""Official prompt construction: template filling, middle truncation in tokens, chat-template routing.

Order of operations (as in the official ``pred.py``):

1. fill the task template with ``str.format(**record)`` (v2: plain ``$PLACEHOLDER$`` replacement);
2. middle-truncate the raw prompt to ``max_length`` tokens of the evaluated model, counted with the
   tokenizer's default special tokens. v1/E (``LongBench/pred.py``): the first and the last
   ``int(max_length / 2)`` tokens, each half decoded separately; v2 (``pred.py`` of LongBench v2):
   ``ids[:max_len//2] + ids[-max_len//2:]`` decoded once;
3. wrap the (truncated) prompt in the chat template as one user turn, unless the mode or the task says
   raw text (``official`` skips trec, triviaqa, samsum, lsht, lcc, repobench-p; base models never);
4. tokenize, without adding special tokens again when the templated text already holds the BOS string.

For ``--compress context`` the same token ids are split in two: the prefix up to the end of the
context (compressed before the question is seen) and the tail (question, instructions, answer cue,
closing chat tags); see :func:`context_tail` and :func:`encode`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .tasks import Task, read_config

CHAT_TEMPLATE_MODES = ("official", "none", "hf_all")
V2_TEMPLATES = read_config("v2_prompts.json")["templates"]


def build_prompt(task: Task, record: dict) -> str:
    """Fill the official template of ``task`` with the record's fields (no other text is added)."""
    return task.prompt.format(**record)


def build_v2_prompt(record: dict, template: str = "0shot", cot: str | None = None) -> str:
    """Fill a LongBench v2 template by plain replacement, in the official order."""
    if template not in V2_TEMPLATES:
        raise ValueError(f"unknown LongBench v2 template {template!r}; accepted: {', '.join(V2_TEMPLATES)}")
    text = V2_TEMPLATES[template]
    fields = [("$DOC$", record["context"]), ("$Q$", record["question"]), ("$C_A$", record["choice_A"]),
              ("$C_B$", record["choice_B"]), ("$C_C$", record["choice_C"]), ("$C_D$", record["choice_D"])]
    if cot is not None:
        fields.append(("$COT$", cot))
    for placeholder, value in fields:
        text = text.replace(placeholder, value.strip())
    return text


def context_tail(task: Task, record: dict) -> str | None:
    """The formatted template text after ``{context}`` (question, instructions, answer cue), or None
    when the template puts ``{input}`` before the context: then no split is made (the sample is run
    question-aware and counted as a fallback). No official v1 template does so."""
    head, marker, tail = task.prompt.partition("{context}")
    if not marker or "{input}" in head:
        return None
    return tail.format(**record)


def v2_context_tail(record: dict, template: str) -> str | None:
    """The filled v2 template text after ``$DOC$`` (None for templates without a document)."""
    text = V2_TEMPLATES[template]
    head, marker, tail = text.partition("$DOC$")
    if not marker or "$Q$" in head:
        return None
    for placeholder, key in (("$Q$", "question"), ("$C_A$", "choice_A"), ("$C_B$", "choice_B"),
                             ("$C_C$", "choice_C"), ("$C_D$", "choice_D")):
        tail = tail.replace(placeholder, record[key].strip())
    return tail


def count_tokens(tokenizer, text: str) -> int:
    """Token count with the tokenizer's default special tokens (a BOS, when added, is counted)."""
    return len(tokenizer(text).input_ids)


def truncate_middle(tokenizer, prompt: str, max_length: int | None) -> tuple[str, int]:
    """Official middle truncation; returns the new prompt text and the raw token count."""
    ids = tokenizer(prompt).input_ids
    if max_length is None or len(ids) <= max_length:
        return prompt, len(ids)
    half = int(max_length / 2)
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True) if half else ""
    return head + tail, len(ids)


def truncate_middle_v2(tokenizer, prompt: str, max_length: int | None) -> tuple[str, int]:
    """LongBench v2's middle truncation: ``ids[:max_len//2] + ids[-max_len//2:]`` decoded in one piece
    (``-max_len//2`` is ``(-max_len)//2``, so an odd limit keeps one more token at the end)."""
    ids = tokenizer.encode(prompt)
    if max_length is None or len(ids) <= max_length:
        return prompt, len(ids)
    kept = ids[:max_length // 2] + ids[-max_length // 2:]
    return tokenizer.decode(kept, skip_special_tokens=True), len(ids)


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer defines a chat template (base models do not and are never templated)."""
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat_template(tokenizer, task: Task | None, mode: str) -> bool:
    """Apply the chat template to this task under ``mode``? (``task=None`` is LongBench v2: always.)"""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"unknown chat-template mode {mode!r}; accepted: {', '.join(CHAT_TEMPLATE_MODES)}")
    if mode == "none" or not has_chat_template(tokenizer):
        return False
    if mode == "hf_all" or task is None:
        return True
    return not task.skip_chat_template


def template_hash(tokenizer) -> str | None:
    """Short hash of the chat template string, recorded with the run."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    if not isinstance(template, str):
        template = repr(template)
    return hashlib.sha256(template.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelInput:
    """The token ids fed to ``generate`` and the counts recorded per sample."""

    input_ids: list[int]
    raw_tokens: int        # formatted prompt, before truncation
    truncated_tokens: int  # prompt after truncation, before the chat template
    truncated: bool
    templated: bool
    context_end: int | None = None  # ids[:context_end] end with the context (only when a tail was given)


def encode(tokenizer, prompt: str, *, task: Task | None, max_length: int | None,
           chat_template: str = "official", tail: str | None = None) -> ModelInput:
    """Truncate, template and tokenize one prompt exactly as the official code does (``task=None`` is
    LongBench v2). With ``tail`` (the prompt text after the context), also find where the context
    ends in the token ids: the first token starting at or after the context's last character. No
    split (``context_end=None``) when the truncated prompt no longer ends with the tail (a tail longer
    than half of ``max_length``) or the chat template rewrites the prompt text."""
    truncate = truncate_middle if task is not None else truncate_middle_v2
    text, raw_tokens = truncate(tokenizer, prompt, max_length)
    truncated = text != prompt
    truncated_tokens = count_tokens(tokenizer, text) if truncated else raw_tokens
    context_char = len(text) - len(tail) if tail and text.endswith(tail) else None
    templated = use_chat_template(tokenizer, task, chat_template)
    special = True
    if templated:
        content = text
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        bos = getattr(tokenizer, "bos_token", None)
        special = not (bos and bos in text)
        start = text.find(content)
        context_char = None if context_char is None or start < 0 else start + context_char
    if context_char is None:
        return ModelInput(list(tokenizer(text, add_special_tokens=special).input_ids), raw_tokens,
                          truncated_tokens, truncated, templated)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("--compress context needs a fast tokenizer (character offsets of the tokens)")
    encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids, offsets = list(encoded.input_ids), encoded.offset_mapping
    split = next((i for i, (begin, end) in enumerate(offsets) if end > begin >= context_char), None)
    if split is not None and not 0 < split < len(ids):
        split = None
    return ModelInput(ids, raw_tokens, truncated_tokens, truncated, templated, split)
