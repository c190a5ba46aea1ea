"""From predictions to scores: post-processing, max over references, task scores, LongBench-E buckets,
LongBench v2 accuracy and the averages reported by papers and the leaderboard.

Task score (v1): ``round(100 * mean(sample scores), 2)`` with one sample score per prediction, the
maximum of the metric over the record's ``answers``. LongBench-E: ``round(100 * np.mean(x), 2)`` per
length bucket, as the official ``scorer_e`` (an empty bucket is ``None``). v2: accuracy x100 rounded to one decimal, overall and by difficulty and length.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

from .metrics import metric_with_failure
from .tasks import Task, e_buckets, english16, read_config, tasks


def postprocess(task: Task, prediction: str) -> str:
    """The official post-processing: first line (after leading ``\\n``) for the few-shot tasks only."""
    if task.first_line_only:
        return prediction.lstrip("\n").split("\n")[0]
    return prediction


@dataclass(frozen=True)
class SampleScore:
    """The score of one prediction (0..1) and whether ROUGE recursed too deep on some reference."""

    score: float
    rouge_recursion: bool = False


def score_sample(task: Task, prediction: str, answers: list[str],
                 all_classes: list[str] | None = None) -> SampleScore:
    """Maximum of the task metric over the references, after post-processing."""
    prediction = postprocess(task, prediction)
    best, recursion = 0.0, False
    for reference in answers:
        value, failure = metric_with_failure(task.metric, prediction, reference, all_classes)
        best = max(best, value)
        recursion |= failure == "recursion"
    return SampleScore(best, recursion)


def mean_score(values: list[float], digits: int = 2) -> float | None:
    """``round(100 * mean, digits)``; None for an empty list (the reference code yields NaN)."""
    if not values:
        return None
    return round(100 * sum(values) / len(values), digits)


def mean_score_e(values: list[float]) -> float | None:
    """A LongBench-E bucket score exactly as the official ``scorer_e``: ``round(100 * np.mean(x), 2)``.
    ``np.mean`` sums pairwise and ``round`` of a NumPy float rounds by scaling, so the result can differ
    by 0.01 from ``round(100 * sum / len, 2)``; None for an empty bucket (NaN in the reference code)."""
    if not values:
        return None
    import numpy as np

    return float(round(100 * np.mean(np.asarray(values, dtype=np.float64)), 2))


def task_classes(records: list[dict]) -> list[str] | None:
    """The task's ``all_classes`` as the official eval passes it: the value of the last record."""
    return records[-1].get("all_classes") if records else None


def score_task(task: Task, records: list[dict]) -> tuple[float | None, list[SampleScore]]:
    """Task score over prediction records (``pred``, ``answers``, ``all_classes``) and the per-sample scores."""
    classes = task_classes(records)
    samples = [score_sample(task, r["pred"], r["answers"], classes) for r in records]
    return mean_score([s.score for s in samples]), samples


def bucket_of(length: int) -> str:
    """The LongBench-E bucket name of a record ``length``."""
    for name, low, high in e_buckets():
        if length >= low and (high is None or length < high):
            return name
    raise ValueError(f"length {length} falls in no LongBench-E bucket")


def score_task_e(task: Task, records: list[dict]) -> dict[str, float | None]:
    """LongBench-E: the task score computed separately in each length bucket."""
    _, samples = score_task(task, records)
    groups: dict[str, list[float]] = {name: [] for name, _, _ in e_buckets()}
    for record, sample in zip(records, samples):
        groups[bucket_of(int(record["length"]))].append(sample.score)
    return {name: mean_score_e(values) for name, values in groups.items()}


_V2 = read_config("v2_prompts.json")


def extract_v2_answer(response: str) -> str | None:
    """The letter of ``The correct answer is (X)`` (or without parentheses) after deleting ``*``."""
    text = response.replace("*", "")
    for pattern in (_V2["answer_regex_primary"], _V2["answer_regex_fallback"]):
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return None


def score_v2(records: list[dict]) -> dict:
    """Accuracy x100 (one decimal) overall, by difficulty and by length, plus unanswered counts."""
    groups: dict[str, list[float]] = defaultdict(list)
    unanswered = 0
    for r in records:
        letter = extract_v2_answer(r["pred"])
        unanswered += letter is None
        correct = float(letter == r["answer"])
        groups["overall"].append(correct)
        groups[r["difficulty"]].append(correct)
        groups[r["length"]].append(correct)
    keys = ["overall", "easy", "hard", "short", "medium", "long"]
    out = {k: mean_score(groups.get(k, []), digits=1) for k in keys}
    out["unanswered"] = unanswered
    out["samples"] = len(records)
    return out


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return round(sum(values) / len(values), 2) if values else None


def leaderboard_averages(scores: dict[str, float]) -> dict[str, float | None]:
    """Per language: the mean of category means (code counts in both languages); None if incomplete."""
    out = {}
    for language in ("en", "zh"):
        members = [t for t in tasks().values() if t.language in (language, "code")]
        if not all(t.name in scores for t in members):
            out[f"leaderboard_{language}"] = None
            continue
        categories: dict[str, list[float]] = defaultdict(list)
        for t in members:
            categories[t.category].append(scores[t.name])
        out[f"leaderboard_{language}"] = _mean([sum(v) / len(v) for v in categories.values()])
    return out


def aggregates(v1: dict[str, float | None], e: dict[str, dict[str, float | None]]) -> dict:
    """Averages of a run: the 16-task English mean of the papers (only when all 16 are present), the
    mean over every scored v1 task, the leaderboard means and the LongBench-E mean per bucket."""
    scored = {k: v for k, v in v1.items() if v is not None}
    en16 = english16()
    out: dict = {
        "avg_en16": _mean([scored[t] for t in en16]) if all(t in scored for t in en16) else None,
        "avg_tasks": _mean(list(scored.values())),
        "n_tasks": len(scored),
    }
    out.update(leaderboard_averages(scored))
    if e:
        out["e_overall"] = {name: _mean([b[name] for b in e.values()]) for name, _, _ in e_buckets()}
    return out
