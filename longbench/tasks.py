"""The LongBench task table, read from the JSON configuration shipped in ``config/``.

Tasks are data: a :class:`Task` carries the official prompt template, generation length, metric name
and the few protocol flags (chat-template skip, first-line rule, newline stop). The runner and the
scorer are generic over them. Configuration names map to tasks as the official code does: a v1 config
is the task name, a LongBench-E config is ``<task>_e`` (same template, length and metric as its base
task), and ``v2`` is LongBench v2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

V2_CONFIG = "v2"
E_SUFFIX = "_e"


def read_config(name: str):
    """Parse one JSON file of the package's ``config/`` folder."""
    return json.loads(resources.files(__package__).joinpath("config", name).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Task:
    """One LongBench v1 task: its official template, generation length, metric and protocol flags."""

    name: str
    display_name: str
    language: str
    category: str
    metric: str
    prompt: str
    max_new_tokens: int
    skip_chat_template: bool
    first_line_only: bool
    stop_at_newline: bool
    in_english16: bool
    has_e: bool
    n_samples_v1: int
    n_samples_e: int | None


@dataclass(frozen=True)
class Config:
    """A dataset configuration to run: a v1 task, its LongBench-E variant, or LongBench v2."""

    name: str            # "qasper", "qasper_e" or "v2"
    task: Task | None    # None for v2
    is_e: bool = False

    @property
    def is_v2(self) -> bool:
        return self.name == V2_CONFIG


@lru_cache(maxsize=1)
def tasks() -> dict[str, Task]:
    """All 21 v1 tasks by name, in the order of ``tasks.json``."""
    table = read_config("tasks.json")
    prompts = read_config("dataset2prompt.json")
    maxlen = read_config("dataset2maxlen.json")
    metric = read_config("dataset2metric.json")
    out = {}
    for row in table["tasks"]:
        name = row["name"]
        out[name] = Task(
            name=name, display_name=row["display_name"], language=row["language"],
            category=row["category"], metric=metric[name], prompt=prompts[name],
            max_new_tokens=int(maxlen[name]), skip_chat_template=bool(row["skip_chat_template"]),
            first_line_only=bool(row["first_line_only"]), stop_at_newline=bool(row["stop_at_newline"]),
            in_english16=bool(row["in_english16"]), has_e=row["hf_config_e"] is not None,
            n_samples_v1=int(row["n_samples_v1"]), n_samples_e=row["n_samples_e"],
        )
    return out


@lru_cache(maxsize=1)
def english16() -> tuple[str, ...]:
    """The 16 English tasks in the column order of the KV-cache papers."""
    return tuple(read_config("tasks.json")["english16_paper_order"])


@lru_cache(maxsize=1)
def e_buckets() -> tuple[tuple[str, int, int | None], ...]:
    """LongBench-E length buckets as (name, min, max_exclusive or None)."""
    return tuple((b["name"], b["min"], b["max_exclusive"]) for b in read_config("tasks.json")["e_length_buckets"])


def all_config_names() -> list[str]:
    """Every configuration name the harness accepts: 21 v1 tasks, 13 LongBench-E configs and ``v2``."""
    names = list(tasks())
    names += [t.name + E_SUFFIX for t in tasks().values() if t.has_e]
    return names + [V2_CONFIG]


GROUPS = {
    "all": lambda: list(tasks()),
    "en16": lambda: list(english16()),
    "zh": lambda: [t.name for t in tasks().values() if t.language == "zh"],
    "e": lambda: [t.name + E_SUFFIX for t in tasks().values() if t.has_e],
}


def resolve_config(name: str) -> Config:
    """Map a configuration name to its task; ``ValueError`` naming the accepted names otherwise."""
    if name == V2_CONFIG:
        return Config(V2_CONFIG, None)
    table = tasks()
    if name in table:
        return Config(name, table[name])
    if name.endswith(E_SUFFIX) and name[: -len(E_SUFFIX)] in table and table[name[: -len(E_SUFFIX)]].has_e:
        return Config(name, table[name[: -len(E_SUFFIX)]], is_e=True)
    raise ValueError(
        f"unknown LongBench task {name!r}; accepted: {', '.join(all_config_names())} "
        f"or a group: {', '.join(GROUPS)}"
    )


def parse_task_list(text: str | list[str]) -> list[Config]:
    """Parse ``"qasper,hotpotqa_e"`` (or a list) into configurations, expanding group names."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        names.extend(GROUPS[item]() if item in GROUPS else [item])
    if not names:
        raise ValueError("--tasks is empty; give at least one task name")
    seen: dict[str, Config] = {}
    for name in names:
        seen.setdefault(name, resolve_config(name))
    return list(seen.values())


def known_max_length(model: str) -> tuple[int, str] | None:
    """The v1 truncation length of ``model`` from ``model2maxlen.json`` and where it comes from, or
    None for a model it does not list. The model is matched by the last part of its hub id or path,
    case-insensitively: the official table first, then the lengths used by the anchor papers."""
    table = read_config("model2maxlen.json")
    name = model.rstrip("/").split("/")[-1].lower()
    for section in ("official_v1", "anchor_protocols"):
        for key, value in table[section].items():
            if key.lower() == name:
                length = value["max_length"] if isinstance(value, dict) else value
                return int(length), f"model2maxlen.json {section}[{key!r}]"
    return None
