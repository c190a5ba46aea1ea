"""Figures across run folders (matplotlib, Agg backend): score against budget per task and on average,
one line per policy with the full cache as a dashed reference, and mean KV bytes against score."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .results import score_run


def load_runs(folders: list[str]) -> list[dict]:
    """One entry per run folder: label, policy name, budget, per-task scores, average, KV bytes."""
    runs = []
    for folder in folders:
        result = score_run(folder)
        meta = result["run"].get("metadata", {})
        rows = [r for r in result["rows"] if r["score"] is not None]
        agg = result["aggregates"]
        avg = agg.get("avg_en16") if agg.get("avg_en16") is not None else agg.get("avg_tasks")
        weights = [(r["kv_bytes"], r["samples"]) for r in rows if r.get("kv_bytes") is not None]
        runs.append({
            "folder": str(folder), "policy": meta.get("policy_name", result["run"]["config"]["policy"]),
            "budget": meta.get("budget"), "scores": {r["task"]: r["score"] for r in rows}, "avg": avg,
            "kv_bytes": sum(b * n for b, n in weights) / sum(n for _, n in weights) if weights else None,
        })
    return runs


def _budget_axes(ax, runs: list[dict], key) -> None:
    by_policy: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run in runs:
        value = key(run)
        if value is None:
            continue
        if run["budget"] is None:
            ax.axhline(value, linestyle="--", color="black", linewidth=1, label=f"{run['policy']}")
        else:
            by_policy[run["policy"]].append((float(run["budget"]), value))
    for policy, points in sorted(by_policy.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=policy)
    ax.set_xlabel("budget (slots per KV head, or fraction of the prompt)")
    ax.grid(alpha=0.3)


def plot_runs(folders: list[str], out_dir: str) -> list[Path]:
    """Write ``score_vs_budget.png`` (average and one panel per task) and ``kv_bytes_vs_score.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(folders)
    tasks = sorted({t for run in runs for t in run["scores"]})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    panels = ["average"] + tasks
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        key = (lambda r: r["avg"]) if panel == "average" else (lambda r, t=panel: r["scores"].get(t))
        _budget_axes(ax, runs, key)
        ax.set_title(panel)
        ax.set_ylabel("score")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    paths = [out / "score_vs_budget.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for run in runs:
        if run["kv_bytes"] is None or run["avg"] is None:
            continue
        label = run["policy"] if run["budget"] is None else f"{run['policy']} {run['budget']}"
        ax.scatter(run["kv_bytes"] / 2**20, run["avg"])
        ax.annotate(label, (run["kv_bytes"] / 2**20, run["avg"]), fontsize="small",
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("mean KV cache size per sample (MiB)")
    ax.set_ylabel("average score")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "kv_bytes_vs_score.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def plot_comparison(rows: list[dict], path: str | Path) -> Path:
    """``kvpress compare``'s figure: fidelity and score against KV bytes relative to transformers'
    `DynamicCache` for the same tokens,
    one line per policy (and compression mode), the full cache as a black star. ``rows`` are the
    summary rows of ``report.comparison_rows`` (first row: the full cache)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full, others = rows[0], rows[1:]
    lines: dict[str, list[dict]] = defaultdict(list)
    for row in others:
        if row["kv_vs_dynamic"] is not None:
            name = row["policy"] if row["compress"] == "question" else f"{row['policy']} [context]"
            lines[name].append(row)
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.3))
    for ax, key, title in ((axes[0], "fidelity", "fidelity to the full cache"),
                           (axes[1], "score", "LongBench score")):
        for name, points in sorted(lines.items()):
            points = sorted((p for p in points if p[key] is not None), key=lambda p: p["kv_vs_dynamic"])
            ax.plot([p["kv_vs_dynamic"] for p in points], [p[key] for p in points], marker="o", label=name)
        reference = 100.0 if key == "fidelity" else full["score"]
        if reference is not None and full["kv_vs_dynamic"] is not None:
            ax.plot([full["kv_vs_dynamic"]], [reference], marker="*", markersize=11, color="black", linestyle="none",
                    label="full cache")
        ax.set_xlabel("KV bytes relative to DynamicCache")
        ax.set_title(title, fontsize="medium")
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fidelity (0-100)")
    axes[1].set_ylabel("average score (0-100)")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
