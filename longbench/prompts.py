"""Official prompt construction: template filling, middle truncation in tokens, chat-template routing.

Order of operations (as in the official ``pred.py``):

1. fill the task template with ``str.format(**record)`` (v2: plain ``$PLACEHOLDER$`` replacement);
2. middle-truncate the raw prompt to ``max_length`` tokens of the evaluated model, counted with the
   tokenizer's default special tokens: keep the decoded first and last ``int(max_length / 2)`` tokens;
3. wrap the (truncated) prompt in the chat template as one user turn, unless the mode or the task says
   raw text (``official`` skips trec, triviaqa, samsum, lsht, lcc, repobench-p; base models never);
4. tokenize, without adding special tokens again when the templated text already holds the BOS string.
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


def encode(tokenizer, prompt: str, *, task: Task | None, max_length: int | None,
           chat_template: str = "official") -> ModelInput:
    """Truncate, template and tokenize one prompt exactly as the official code does."""
    text, raw_tokens = truncate_middle(tokenizer, prompt, max_length)
    truncated = text != prompt
    truncated_tokens = count_tokens(tokenizer, text) if truncated else raw_tokens
    templated = use_chat_template(tokenizer, task, chat_template)
    if templated:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        bos = getattr(tokenizer, "bos_token", None)
        ids = tokenizer(text, add_special_tokens=not (bos and bos in text)).input_ids
    else:
        ids = tokenizer(text).input_ids
    return ModelInput(list(ids), raw_tokens, truncated_tokens, truncated, templated)
