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
from dataclasses import dataclass
from pathlib import Path

from .fidelity import run_fidelity
from .scoring import aggregates, score_task, score_task_e, score_v2
from .store import RunStore
from .tasks import e_buckets, resolve_config

COLUMNS = ["task", "metric", "score", "samples", "prompt_tokens", "kv_slots_kept", "kv_bytes", "kv_vs_dynamic",
           "seconds"]


def _mean(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def task_row(name: str, records: list[dict]) -> tuple[dict, object]:
    """One table row and the official score object of a task's predictions."""
    config = resolve_config(name)
    row = {"task": name, "samples": len(records), "prompt_tokens": _mean(records, "input_tokens"),
           "kv_slots_kept": _mean(records, "kv_slots_kept"), "kv_bytes": _mean(records, "kv_bytes"),
           "kv_bytes_dynamic": _mean(records, "kv_bytes_dynamic"), "kv_vs_dynamic": vs_dynamic(records),
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


OFFICIAL_SUITE_SIZES = {"v1": 4750, "e": 3668, "v2": 503}


def official_count(name: str) -> int:
    """Samples of a configuration in the full official data (``tasks.json``; v2: 503)."""
    config = resolve_config(name)
    if config.is_v2:
        return OFFICIAL_SUITE_SIZES["v2"]
    return config.task.n_samples_e if config.is_e else config.task.n_samples_v1


def suite_of(name: str) -> str:
    config = resolve_config(name)
    return "v2" if config.is_v2 else "e" if config.is_e else "v1"


def completeness(counts: dict[str, tuple[int, int | None]]) -> dict:
    """Whether a run covers its data and the official sets: ``counts`` maps a task to (predictions,
    records of the run's data or None when unknown)."""
    tasks_ = {name: {"predicted": done, "dataset": size, "official": official_count(name)}
              for name, (done, size) in counts.items()}
    suites = {}
    for name, row in tasks_.items():
        suite = suites.setdefault(suite_of(name), {"predicted": 0, "official": OFFICIAL_SUITE_SIZES[suite_of(name)]})
        suite["predicted"] += row["predicted"]
    for suite in suites.values():
        suite["complete"] = suite["predicted"] == suite["official"]
    missing = {n: r["dataset"] - r["predicted"] for n, r in tasks_.items()
               if r["dataset"] is not None and r["predicted"] < r["dataset"]}
    short = {n: r for n, r in tasks_.items() if r["dataset"] is not None and r["dataset"] != r["official"]}
    notes = [f"{n}: {k} sample(s) of the data not predicted yet" for n, k in missing.items()]
    notes += [f"{n}: the data holds {r['dataset']} records, the official set {r['official']}" for n, r in short.items()]
    notes += [f"{suite}: {row['predicted']} of the official {row['official']} samples"
              for suite, row in suites.items() if not row["complete"]]
    return {"complete": not missing, "official_data": not short, "official_complete": all(r["complete"] for r in suites.values()),
            "tasks": tasks_, "suites": suites, "notes": notes}


def load_scored_records(out_dir) -> tuple[dict, dict[str, list[dict]], dict]:
    """The header, each task's predictions (only ids of the run's data when ``dataset_ids.json``
    exists) and the completeness block."""
    store = RunStore(out_dir)
    header = store.read_header()
    if header is None:
        raise FileNotFoundError(f"{out_dir} is not a run folder (no {store.header_path.name})")
    ids = store.read_dataset_ids() or {}
    records, counts = {}, {}
    for name in header["config"]["tasks"]:
        found = store.load(name)
        if name in ids:
            keep = set(ids[name])
            found = [r for r in found if r["_id"] in keep]
        records[name] = found
        counts[name] = (len(found), len(ids[name]) if name in ids else None)
    return header, records, completeness(counts)


def score_run(out_dir, reference=None) -> dict:
    """Score every task of a run folder from its prediction files; returns the result dictionary.
    ``reference``: a full-cache run folder of the same data and protocol, for the fidelity scores."""
    header, by_task, complete = load_scored_records(out_dir)
    v1, e, rows, result = {}, {}, [], {}
    for name, records in by_task.items():
        if not records:
            continue
        row, score = task_row(name, records)
        rows.append(row)
        result[name] = score
        config = resolve_config(name)
        if config.is_v2:
            continue
        (e if config.is_e else v1)[name] = score
    if reference is not None:
        fidelity = run_fidelity(by_task, reference)
        for row in rows:
            row.update({k: fidelity["tasks"].get(row["task"], {}).get(k) for k in ("fidelity", "identical")})
        result["fidelity"] = fidelity
    result["aggregates"] = aggregates(v1, e)
    result["completeness"] = complete
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
    fidelity = [c for c in ("fidelity", "identical") if any(r.get(c) is not None for r in rows)]
    return COLUMNS[:3] + buckets + fidelity + COLUMNS[3:]


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


def mean_kv_bytes(result: dict) -> float | None:
    """Mean KV bytes per sample over every task of a run (weighted by samples)."""
    pairs = [(r["kv_bytes"], r["samples"]) for r in result["rows"] if r.get("kv_bytes") is not None]
    total = sum(n for _, n in pairs)
    return sum(b * n for b, n in pairs) / total if total else None


def vs_dynamic(records: list[dict]) -> float | None:
    """KV bytes held relative to transformers' `DynamicCache` for the same tokens, over `records`
    (predictions or task rows weighted by samples): the sum of bytes held over the sum of
    `DynamicCache`'s. None for results written before the reference was recorded."""
    pairs = [(r["kv_bytes"] * r.get("samples", 1), r["kv_bytes_dynamic"] * r.get("samples", 1)) for r in records
             if r.get("kv_bytes") is not None and r.get("kv_bytes_dynamic")]
    if not pairs or len(pairs) < len(records):
        return None
    return sum(held for held, _ in pairs) / sum(dynamic for _, dynamic in pairs)


def run_average(result: dict) -> float | None:
    agg = result["aggregates"]
    return agg["avg_en16"] if agg.get("avg_en16") is not None else agg.get("avg_tasks")


@dataclass
class ComparedRun:
    """One run of ``kvpress compare``: its spec, compression mode and scored result."""

    spec: str
    compress: str
    result: dict
    policy: str = "full"
    budget: float | int | None = None

    @property
    def label(self) -> str:
        return self.spec if self.compress == "question" else f"{self.spec} [context]"

    def summary(self) -> dict:
        fidelity = self.result.get("fidelity") or {}
        return {"run": self.label, "policy": self.policy, "budget": self.budget, "compress": self.compress,
                "task": "all", "score": run_average(self.result), "fidelity": fidelity.get("avg"),
                "identical": fidelity.get("identical"), "kv_bytes": mean_kv_bytes(self.result),
                "kv_vs_dynamic": vs_dynamic(self.result["rows"]),
                "seconds": sum(r["seconds"] for r in self.result["rows"])}

    def task_rows(self) -> list[dict]:
        return [{"run": self.label, "policy": self.policy, "budget": self.budget, "compress": self.compress,
                 "task": r["task"], "score": r["score"], "fidelity": r.get("fidelity"),
                 "identical": r.get("identical"), "kv_bytes": r.get("kv_bytes"),
                 "kv_vs_dynamic": r.get("kv_vs_dynamic"), "seconds": r["seconds"]}
                for r in self.result["rows"]]


COMPARE_COLUMNS = ["run", "score", "fidelity", "identical %", "KV bytes vs DynamicCache", "generation s"]


def comparison_rows(runs: list[ComparedRun]) -> list[dict]:
    """One summary row per run; the first run is the full-cache reference."""
    return [run.summary() for run in runs]


def comparison_table(runs: list[ComparedRun]) -> str:
    """The summary table: average score, fidelity to the full cache, identical share, mean KV bytes
    relative to `DynamicCache` for the same tokens, generation seconds (sum over samples)."""
    lines = ["| " + " | ".join(COMPARE_COLUMNS) + " |", "|---|" + "---:|" * (len(COMPARE_COLUMNS) - 1)]
    for i, row in enumerate(comparison_rows(runs)):
        fidelity = "reference" if i == 0 else _fmt(row["fidelity"])
        identical = "reference" if i == 0 else _fmt(row["identical"], 1)
        cells = [row["run"], _fmt(row["score"]), fidelity, identical, _fmt(row["kv_vs_dynamic"], 3),
                 _fmt(row["seconds"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_task_table(runs: list[ComparedRun]) -> str:
    """Score and fidelity of every task: one row per run, cells ``score / fidelity``."""
    tasks: list[str] = []
    for run in runs:
        tasks += [r["task"] for r in run.result["rows"] if r["task"] not in tasks]
    lines = ["| run | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for i, run in enumerate(runs):
        rows = {r["task"]: r for r in run.task_rows()}
        cells = [_fmt(rows[t]["score"]) + ("" if i == 0 else f" / {_fmt(rows[t]['fidelity'])}")
                 if t in rows else "-" for t in tasks]
        lines.append(f"| {run.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_csv(runs: list[ComparedRun]) -> str:
    """Long format: one row per (run, task) plus a row per run with ``task = all``."""
    columns = ["run", "policy", "budget", "compress", "task", "score", "fidelity", "identical", "kv_bytes",
               "kv_vs_dynamic", "seconds"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for run, summary in zip(runs, comparison_rows(runs)):
        writer.writerow(summary)
        writer.writerows(run.task_rows())
    return buffer.getvalue()
