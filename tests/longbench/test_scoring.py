"""Aggregation (16-task mean, leaderboard, LongBench-E), LongBench v2 accuracy, reports and plots."""

from __future__ import annotations

import json

import pytest

from kvpress.longbench import scoring
from kvpress.longbench.tasks import english16, tasks


def test_en16_mean_and_leaderboard_categories():
    scores = {name: float(i) for i, name in enumerate(tasks())}
    agg = scoring.aggregates(scores, {})
    assert agg["avg_en16"] == round(sum(scores[t] for t in english16()) / 16, 2)
    en = {"single-doc QA": ["narrativeqa", "qasper", "multifieldqa_en"], "multi-doc QA": ["hotpotqa", "2wikimqa", "musique"],
          "summarization": ["gov_report", "qmsum", "multi_news"], "few-shot": ["trec", "triviaqa", "samsum"],
          "synthetic": ["passage_count", "passage_retrieval_en"], "code": ["lcc", "repobench-p"]}
    expected = sum(sum(scores[t] for t in ts) / len(ts) for ts in en.values()) / 6
    assert agg["leaderboard_en"] == pytest.approx(expected, abs=0.005)
    zh = [["multifieldqa_zh"], ["dureader"], ["vcsum"], ["lsht"], ["passage_retrieval_zh"], ["lcc", "repobench-p"]]
    assert agg["leaderboard_zh"] == pytest.approx(sum(sum(scores[t] for t in ts) / len(ts) for ts in zh) / 6, abs=0.005)


def test_partial_runs_have_no_en16_average():
    agg = scoring.aggregates({"lcc": 50.0, "trec": 30.0}, {})
    assert agg["avg_en16"] is None and agg["avg_tasks"] == 40.0 and agg["leaderboard_en"] is None


def test_e_overall_is_the_mean_per_bucket_and_ignores_empty_buckets():
    e = {"qasper_e": {"0-4k": 10.0, "4-8k": 20.0, "8k+": None}, "lcc_e": {"0-4k": 30.0, "4-8k": 40.0, "8k+": 50.0}}
    assert scoring.aggregates({}, e)["e_overall"] == {"0-4k": 20.0, "4-8k": 30.0, "8k+": 50.0}


def test_empty_bucket_is_null():
    task = tasks()["hotpotqa"]
    result = scoring.score_task_e(task, [{"pred": "x", "answers": ["x"], "length": 10}])
    assert result == {"0-4k": 100.0, "4-8k": None, "8k+": None}


@pytest.mark.parametrize("response, letter", [
    ("The correct answer is (B).", "B"), ("**The correct answer is (C)**", "C"),
    ("The correct answer is D", "D"), ("I think (A)", None), ("The correct answer is (E)", None),
])
def test_v2_answer_extraction(response, letter):
    assert scoring.extract_v2_answer(response) == letter


def test_v2_accuracy_by_difficulty_and_length():
    records = [
        {"pred": "The correct answer is (A)", "answer": "A", "difficulty": "easy", "length": "short"},
        {"pred": "The correct answer is (B)", "answer": "A", "difficulty": "hard", "length": "short"},
        {"pred": "", "answer": "C", "difficulty": "hard", "length": "long"},
    ]
    out = scoring.score_v2(records)
    assert out["overall"] == 33.3 and out["easy"] == 100.0 and out["hard"] == 0.0
    assert out["short"] == 50.0 and out["long"] == 0.0 and out["medium"] is None
    assert out["unanswered"] == 1 and out["samples"] == 3


def _fake_run(folder, policy, budget, score_pred, kv_bytes, dynamic_bytes=4000):
    from kvpress.longbench.store import RunStore

    store = RunStore(folder)
    store.write_header({"config": {"policy": policy, "tasks": ["passage_count", "lcc"]},
                        "metadata": {"policy_name": policy.split(":")[0], "budget": budget}})
    path = store.task_path("passage_count")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"_id": str(i), "pred": score_pred if i else "0", "answers": ["3"], "all_classes": None, "length": 5,
             "input_tokens": 100, "kv_slots_kept": 50, "kv_bytes": kv_bytes,
             "kv_bytes_dynamic": dynamic_bytes, "seconds": 1.0} for i in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store.task_path("lcc").write_text(json.dumps(dict(rows[0], pred="x = 1", answers=["x = 1"])) + "\n")


def test_score_and_plot_commands(tmp_path):
    from kvpress.cli import main

    runs = []
    for policy, budget, pred, nbytes in [("full", None, "3", 4000), ("snapkv:budget=0.5", 0.5, "3", 2000),
                                         ("snapkv:budget=0.2", 0.2, "4", 800), ("h2o:budget=0.5", 0.5, "4", 2000)]:
        folder = tmp_path / policy.replace(":", "_")
        _fake_run(folder, policy, budget, pred, nbytes)
        runs.append(str(folder))
    assert main(["longbench", "score", runs[1]]) == 0
    result = json.loads((tmp_path / "snapkv_budget=0.5" / "result.json").read_text())
    assert result["passage_count"] == 50.0 and result["lcc"] == 100.0
    assert (tmp_path / "snapkv_budget=0.5" / "results.md").read_text().count("\n") == 5
    assert main(["longbench", "plot", *runs, "--out", str(tmp_path / "plots")]) == 0
    for name in ("score_vs_budget.png", "kv_bytes_vs_score.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_comparison_table_reports_score_fidelity_bytes_and_time(tmp_path):
    from kvpress.longbench.plot import plot_comparison
    from kvpress.longbench.results import (
        ComparedRun,
        comparison_csv,
        comparison_rows,
        comparison_table,
        per_task_table,
        score_run,
    )

    _fake_run(tmp_path / "a", "full", None, "3", 4200)  # the no-op cache: 1.05x DynamicCache's 4000
    _fake_run(tmp_path / "b", "h2o:budget=0.2", 0.2, "4", 1000)
    runs = [ComparedRun("full", "question", score_run(tmp_path / "a")),
            ComparedRun("h2o:budget=0.2", "question", score_run(tmp_path / "b", reference=tmp_path / "a"), "h2o", 0.2)]
    lines = comparison_table(runs).splitlines()
    assert lines[0] == "| run | score | fidelity | identical % | KV bytes vs DynamicCache | generation s |"
    # passage_count: full says "0" then "3", h2o "0" then "4": one of two samples identical; lcc identical
    assert lines[2] == "| full | 75.00 | reference | reference | 1.050 | 3.0 |"
    assert lines[3] == "| h2o:budget=0.2 | 50.00 | 75.00 | 66.7 | 0.250 | 3.0 |"
    assert per_task_table(runs).splitlines()[3] == "| h2o:budget=0.2 | 0.00 / 50.00 | 100.00 / 100.00 |"
    csv_lines = comparison_csv(runs).splitlines()
    assert csv_lines[0] == "run,policy,budget,compress,task,score,fidelity,identical,kv_bytes,kv_vs_dynamic,seconds"
    assert len(csv_lines) == 1 + 2 * 3
    path = plot_comparison(comparison_rows(runs), tmp_path / "compare.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
