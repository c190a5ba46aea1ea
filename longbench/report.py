"""Scores of a run folder: ``result.json`` plus a table (task, metric, score, samples, mean prompt
tokens, mean slots kept, mean KV bytes, seconds) printed and saved as ``results.md`` and ``results.csv``.

``result.json`` follows the official layout -- ``{task: score}`` for v1, ``{task: {bucket: score}}``
for LongBench-E, the v2 breakdown under ``v2`` -- with an ``aggregates`` block, per-task diagnostics
and the run's header (configuration and metadata).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .scoring import aggregates, score_task, score_task_e, score_v2
from .store import RunStore
from .tasks import e_buckets, resolve_config

COLUMNS = ["task", "metric", "score", "samples", "prompt_tokens", "kv_slots_kept", "kv_bytes", "seconds"]


def _mean(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def task_row(name: str, records: list[dict]) -> tuple[dict, object]:
    """One table row and the official score object of a task's predictions."""
    config = resolve_config(name)
    row = {"task": name, "samples": len(records), "prompt_tokens": _mean(records, "input_tokens"),
           "kv_slots_kept": _mean(records, "kv_slots_kept"), "kv_bytes": _mean(records, "kv_bytes"),
           "seconds": sum(r.get("seconds") or 0.0 for r in records)}
    if config.is_v2:
        v2 = score_v2(records)
        row.update(metric="accuracy", score=v2["overall"])
        return row, v2
    score, samples = score_task(config.task, records)
    row.update(metric=config.task.metric, score=score,
               rouge_recursion_failures=sum(s.rouge_recursion for s in samples))
    if config.is_e:
        buckets = score_task_e(config.task, records)
        row.update(buckets)
        return row, buckets
    return row, score


def score_run(out_dir) -> dict:
    """Score every task of a run folder from its prediction files; returns the result dictionary."""
    store = RunStore(out_dir)
    header = store.read_header()
    if header is None:
        raise FileNotFoundError(f"{out_dir} is not a run folder (no {store.header_path.name})")
    v1, e, rows, result = {}, {}, [], {}
    for name in header["config"]["tasks"]:
        records = store.load(name)
        if not records:
            continue
        row, score = task_row(name, records)
        rows.append(row)
        result[name] = score
        config = resolve_config(name)
        if config.is_v2:
            continue
        (e if config.is_e else v1)[name] = score
    result["aggregates"] = aggregates(v1, e)
    result["rows"] = rows
    result["run"] = header
    return result


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e6 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table_columns(rows: list[dict]) -> list[str]:
    buckets = [b for b, _, _ in e_buckets() if any(b in r for r in rows)]
    return COLUMNS[:3] + buckets + COLUMNS[3:]


def markdown_table(rows: list[dict], aggregates_: dict | None = None) -> str:
    """The score table as GitHub markdown, with an average row."""
    columns = table_columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    if aggregates_ is not None:
        avg = aggregates_.get("avg_en16")
        label, value = ("avg (en16)", avg) if avg is not None else ("avg (tasks)", aggregates_.get("avg_tasks"))
        cells = [label, "", _fmt(value)] + [""] * (len(columns) - 3)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_table(rows: list[dict]) -> str:
    columns = table_columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c) for c in columns})
    return buffer.getvalue()


def write_reports(out_dir, result: dict) -> str:
    """Write result.json, results.md and results.csv; return the markdown table."""
    out = Path(out_dir)
    table = markdown_table(result["rows"], result["aggregates"])
    (out / "result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    (out / "results.csv").write_text(csv_table(result["rows"]), encoding="utf-8")
    return table


def v2_table(result: dict) -> str | None:
    """Markdown breakdown of LongBench v2 accuracy (difficulty and length), if the run has v2."""
    v2 = result.get("v2")
    if not isinstance(v2, dict):
        return None
    keys = ["overall", "easy", "hard", "short", "medium", "long", "unanswered", "samples"]
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                      "| " + " | ".join(_fmt(v2.get(k), 1) for k in keys) + " |"])


def comparison_table(results: dict[str, dict]) -> str:
    """One row per run (label -> result), one column per task, plus the average and KV bytes."""
    tasks: list[str] = []
    for result in results.values():
        tasks += [r["task"] for r in result["rows"] if r["task"] not in tasks]
    columns = ["run"] + tasks + ["avg", "kv_slots_kept", "kv_bytes", "seconds"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for label, result in results.items():
        by_task = {r["task"]: r for r in result["rows"]}
        cells = [label] + [_fmt(by_task[t]["score"]) if t in by_task else "-" for t in tasks]
        agg = result["aggregates"]
        cells.append(_fmt(agg["avg_en16"] if agg.get("avg_en16") is not None else agg.get("avg_tasks")))
        rows = result["rows"]
        weights = [r["samples"] for r in rows]
        for key in ("kv_slots_kept", "kv_bytes"):
            vals = [(r[key], w) for r, w in zip(rows, weights) if r.get(key) is not None]
            cells.append(_fmt(sum(v * w for v, w in vals) / sum(w for _, w in vals), 0) if vals else "-")
        cells.append(_fmt(sum(r["seconds"] for r in rows), 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
