"""Fidelity of a compressed run: how much of what the full cache said it keeps.

A small model scores near zero on most LongBench tasks, so its task scores cannot show what a policy
loses. Fidelity asks a question it can answer: each sample's prediction of the compressed run is
scored with the task's own metric, using the full-cache prediction of the same sample (same model,
prompt and protocol) as the only reference.

Rules, per sample:

* identical post-processed predictions score 1 (the metric of a text against itself is 1, except for
  ROUGE's recursion quirk on long texts and for empty strings, which would otherwise score 0);
* the full-cache prediction is post-processed as the official scorer does (first line for the
  few-shot tasks) and, for the metrics that read a label from the reference, turned into that label:
  ``Paragraph N`` / ``段落N`` (retrieval), a number (count), a class name (classification) -- the label
  the metric credits most in the full-cache prediction, the first one on ties; for code similarity
  its first code line;
* when the metric credits no label in the full-cache prediction (it names no paragraph, no number, no
  class), the sample scores 0 unless the predictions are identical.

Task fidelity is ``round(100 * mean, 2)`` like a task score; a run's fidelity is the mean over its
tasks. LongBench v2: the share of samples whose extracted answer letter (or absence of one) equals
the full cache's. The share of raw predictions identical to the full cache's is reported beside it.
"""

from __future__ import annotations

import re

from .metrics import first_code_line, get_metric, metric_with_failure
from .scoring import extract_v2_answer, mean_score, postprocess, task_classes
from .store import RunStore
from .tasks import Task, resolve_config

LABEL_FORMATS = {"retrieval_score": "Paragraph {}", "retrieval_zh_score": "段落{}", "count_score": "{}"}


def reference_from_prediction(task: Task, prediction: str, all_classes: list[str] | None = None) -> str | None:
    """The full-cache ``prediction`` written as a reference of ``task``'s metric (None: no label)."""
    text = postprocess(task, prediction)
    metric = task.metric
    if metric == "code_sim_score":
        return first_code_line(text)
    if metric in LABEL_FORMATS:
        candidates = [LABEL_FORMATS[metric].format(n) for n in dict.fromkeys(re.findall(r"\d+", text))]
    elif metric == "classification_score":
        candidates = list(all_classes or [])
    else:
        return text
    score = get_metric(metric)
    credited = [(score(text, c, all_classes=all_classes), -i, c) for i, c in enumerate(candidates)]
    best = max(credited, default=None)
    return best[2] if best is not None and best[0] > 0 else None


def sample_fidelity(task: Task, prediction: str, full_prediction: str,
                    all_classes: list[str] | None = None) -> float:
    """The task metric of ``prediction`` against the full cache's prediction of the same sample."""
    mine = postprocess(task, prediction)
    if mine == postprocess(task, full_prediction):
        return 1.0
    reference = reference_from_prediction(task, full_prediction, all_classes)
    if reference is None:
        return 0.0
    return metric_with_failure(task.metric, mine, reference, all_classes)[0]


def task_fidelity(name: str, records: list[dict], full: dict[str, dict]) -> dict | None:
    """Fidelity, identical share and sample count of one task; None when no sample has a reference."""
    pairs = [(r, full[r["_id"]]) for r in records if r["_id"] in full]
    if not pairs:
        return None
    config = resolve_config(name)
    if config.is_v2:
        values = [float(extract_v2_answer(r["pred"]) == extract_v2_answer(f["pred"])) for r, f in pairs]
    else:
        classes = task_classes(records)
        values = [sample_fidelity(config.task, r["pred"], f["pred"], classes) for r, f in pairs]
    identical = [r["pred"] == f["pred"] for r, f in pairs]
    return {"fidelity": mean_score(values), "identical": mean_score([float(i) for i in identical]),
            "n_identical": sum(identical), "samples": len(pairs)}


def run_fidelity(run_records: dict[str, list[dict]], reference_dir) -> dict:
    """Fidelity of a run (task -> its prediction records) against the full-cache run in
    ``reference_dir``: per task, the mean over tasks and the pooled identical share."""
    reference = RunStore(reference_dir)
    if reference.read_header() is None:
        raise FileNotFoundError(f"fidelity reference {reference_dir} is not a run folder (no run.json)")
    tasks = {}
    for name, records in run_records.items():
        full = {r["_id"]: r for r in reference.load(name)}
        result = task_fidelity(name, records, full)
        if result is not None:
            tasks[name] = result
    samples = sum(t["samples"] for t in tasks.values())
    return {
        "reference": str(reference_dir), "tasks": tasks,
        "avg": round(sum(t["fidelity"] for t in tasks.values()) / len(tasks), 2) if tasks else None,
        "identical": round(100 * sum(t["n_identical"] for t in tasks.values()) / samples, 2) if samples else None,
    }
