"""Fidelity to the full cache: the full-cache prediction as the reference of each task's metric."""

from __future__ import annotations

import json

import pytest

from kvpress.longbench.fidelity import reference_from_prediction, run_fidelity, sample_fidelity
from kvpress.longbench.store import RunStore
from kvpress.longbench.tasks import tasks

TREC = ["Abbreviation", "Location", "City", "Country"]


@pytest.mark.parametrize("task, full, reference", [
    ("passage_retrieval_en", "I think it is Paragraph 12.", "Paragraph 12"),
    ("passage_retrieval_en", "12 or 7, mostly 12", "Paragraph 12"),      # the label the metric credits most
    ("passage_retrieval_zh", "段落5", "段落5"),
    ("passage_count", "There are 14 unique paragraphs.", "14"),
    ("passage_count", "no idea", None),                                   # names no number: no reference
    ("trec", "\nCity\nQuestion: what?", "City"),                          # first line, then the class
    ("lcc", "\n# comment\n    return x\n", "    return x"),               # first code line
    ("hotpotqa", "Paris, France", "Paris, France"),
])
def test_full_prediction_as_a_reference(task, full, reference):
    assert reference_from_prediction(tasks()[task], full, TREC) == reference


def test_sample_fidelity_uses_the_task_metric():
    t = tasks()
    assert sample_fidelity(t["hotpotqa"], "Paris", "Paris, France") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert sample_fidelity(t["passage_retrieval_en"], "Paragraph 12", "It is Paragraph 12.") == 1.0
    assert sample_fidelity(t["passage_retrieval_en"], "Paragraph 3", "It is Paragraph 12.") == 0.0
    assert sample_fidelity(t["passage_count"], "5", "no idea") == 0.0
    assert sample_fidelity(t["passage_count"], "no idea", "no idea") == 1.0  # identical predictions
    assert sample_fidelity(t["trec"], "City\nmore", "City\nother", TREC) == 1.0  # identical first lines
    assert sample_fidelity(t["lcc"], "return y", "return x") == pytest.approx(0.88)
    long = " ".join(f"w{i}" for i in range(1200))  # ROUGE would fail on the pair: identity gives 1
    assert sample_fidelity(t["gov_report"], long, long) == 1.0


def _write(folder, policy, preds: dict[str, list[tuple[str, str]]]):
    store = RunStore(folder)
    store.write_header({"config": {"policy": policy, "tasks": list(preds)}, "metadata": {}})
    for task, rows in preds.items():
        path = store.task_path(task)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"_id": i, "pred": p, "answers": ["3"], "all_classes": None}) + "\n"
                                for i, p in rows))


def test_run_fidelity_means_over_tasks_and_pools_identical(tmp_path):
    _write(tmp_path / "full", "full", {"passage_count": [("a", "3"), ("b", "4"), ("c", "5"), ("d", "6")],
                                       "lcc": [("a", "x = 1")]})
    _write(tmp_path / "run", "h2o", {"passage_count": [("a", "3"), ("b", "It is 4"), ("c", "7"), ("d", "6 or 2")],
                                     "lcc": [("a", "x = 1")]})
    records = {t: RunStore(tmp_path / "run").load(t) for t in ("passage_count", "lcc")}
    result = run_fidelity(records, tmp_path / "full")
    assert result["tasks"]["passage_count"] == {"fidelity": 62.5, "identical": 25.0, "n_identical": 1, "samples": 4}
    assert result["tasks"]["lcc"]["fidelity"] == 100.0
    assert result["avg"] == 81.25 and result["identical"] == 40.0  # 2 of 5 predictions identical
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        run_fidelity(records, tmp_path / "missing")
