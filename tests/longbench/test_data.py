"""Data sources: official folder layouts, the bundled sample, clear errors for bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kvpress.longbench import build_sample, data
from kvpress.longbench.tasks import all_config_names, parse_task_list, resolve_config, tasks

DATA = Path(__file__).parent / "data"
V1 = {"input": "q", "context": "c", "answers": ["a"], "length": 3, "dataset": "hotpotqa", "language": "en",
      "all_classes": None, "_id": "x1"}


def write_jsonl(path: Path, records: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("layout", ["{d}/hotpotqa.jsonl", "{d}/data/hotpotqa.jsonl"])
def test_both_official_folder_layouts(tmp_path, layout):
    write_jsonl(Path(layout.format(d=tmp_path)), [V1, dict(V1, _id="x2")])
    records = data.DataSource("dir", str(tmp_path)).load(resolve_config("hotpotqa"))
    assert [r["_id"] for r in records] == ["x1", "x2"]


def test_broken_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "trec.jsonl"
    path.write_text(json.dumps(V1) + "\n\n{broken\n")
    with pytest.raises(data.DataError, match=r"trec.jsonl:3: invalid JSON"):
        data.load_from_dir(tmp_path, resolve_config("trec"))


def test_record_missing_a_field_is_reported(tmp_path):
    write_jsonl(tmp_path / "trec.jsonl", [{k: v for k, v in V1.items() if k != "answers"}])
    with pytest.raises(data.DataError, match=r"trec.jsonl:1: record lacks the field\(s\) answers"):
        data.load_from_dir(tmp_path, resolve_config("trec"))


def test_missing_task_file_lists_the_paths_tried(tmp_path):
    with pytest.raises(data.DataError, match=r"qasper_e.*qasper_e.jsonl"):
        data.load_from_dir(tmp_path, resolve_config("qasper_e"))


def test_repeated_ids_get_distinct_keys(tmp_path):
    write_jsonl(tmp_path / "trec.jsonl", [V1, V1])
    assert [r["_id"] for r in data.load_from_dir(tmp_path, resolve_config("trec"))] == ["x1", "x1#1"]


def test_v2_json_list(tmp_path):
    record = {"_id": "v", "domain": "d", "sub_domain": "s", "difficulty": "easy", "length": "short",
              "question": "q", "choice_A": "a", "choice_B": "b", "choice_C": "c", "choice_D": "d",
              "answer": "A", "context": "text"}
    (tmp_path / "data.json").write_text(json.dumps([record]))
    assert data.load_from_dir(tmp_path, resolve_config("v2"))[0]["answer"] == "A"


def test_unknown_task_names_the_accepted_values():
    with pytest.raises(ValueError, match=r"unknown LongBench task 'hotpot'.*hotpotqa.*qasper_e.*v2"):
        parse_task_list("qasper,hotpot")
    assert [c.name for c in parse_task_list("en16")][:2] == ["narrativeqa", "qasper"]
    assert len(parse_task_list("all")) == 21 and len(parse_task_list("e")) == 13
    assert len(all_config_names()) == 35


def test_config_integrity():
    assert len(tasks()) == 21
    no_input = {"gov_report", "multi_news", "vcsum", "passage_count", "lcc"}
    for name, task in tasks().items():
        assert "{context}" in task.prompt
        assert ("{input}" in task.prompt) == (name not in no_input), name
    assert sum(t.n_samples_v1 for t in tasks().values()) == 4750
    assert sum(t.n_samples_e or 0 for t in tasks().values()) == 3668


def test_auto_source_never_consults_the_network(monkeypatch, tmp_path):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the data source must not depend on the network")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert data.resolve_source("auto").kind == "sample"
    assert data.resolve_source("auto", str(tmp_path)) == data.DataSource("dir", str(tmp_path.resolve()))
    assert data.resolve_source("hub").kind == "hub"  # only when asked for
    with pytest.raises(ValueError, match="auto, hub, dir, sample"):
        data.resolve_source("web")
    with pytest.raises(ValueError, match="--data-dir cannot be combined with --data hub"):
        data.resolve_source("hub", str(tmp_path))


def test_sample_task_outside_the_sample_is_refused():
    with pytest.raises(ValueError, match="not in the bundled sample.*lcc"):
        data.DataSource("sample").load(resolve_config("qasper"))


def test_bundled_sample_is_small_and_official_format():
    assert data.sample_tasks() == ["lcc", "multifieldqa_en", "passage_count", "passage_retrieval_en"]
    for name in data.sample_tasks():
        records = data.DataSource("sample").load(resolve_config(name))
        assert 3 <= len(records) <= 4
        for r in records:
            assert set(r) == {"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"}
            assert r["length"] == sum(len(t.split()) for t in [r["input"], r["context"], *r["answers"]])


def test_sample_references_are_answerable():
    for r in data.DataSource("sample").load(resolve_config("multifieldqa_en")):
        assert any(a in r["context"] for a in r["answers"])
    for r in data.DataSource("sample").load(resolve_config("passage_retrieval_en")):
        k = int(r["answers"][0].split()[1])
        assert f"Paragraph {k}: {r['input']}" in r["context"]
    for r in data.DataSource("sample").load(resolve_config("passage_count")):
        paragraphs = [p.split(": ", 1)[1] for p in r["context"].split("\n\n")]
        assert str(len(set(paragraphs))) == r["answers"][0]


@pytest.mark.skipif(".".join(map(str, sys.version_info[:3])) != build_sample.BUILT_WITH,
                    reason="the sample was built from another Python version's files")
def test_sample_rebuilds_identically():
    assert build_sample.main(["--check"]) == 0


def test_hub_source_reads_the_config_from_data_zip(tmp_path, monkeypatch):
    import zipfile

    import huggingface_hub

    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/trec.jsonl", json.dumps(V1) + "\n")
        zf.writestr("data/trec_e.jsonl", json.dumps(dict(V1, _id="e")) + "\n")
    calls = []

    def fake_download(repo_id, filename, repo_type):
        calls.append((repo_id, filename, repo_type))
        return str(archive)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert [r["_id"] for r in data.DataSource("hub").load(resolve_config("trec"))] == ["x1"]
    assert calls == [("THUDM/LongBench", "data.zip", "dataset")]
    with pytest.raises(data.DataError, match="holds no qasper.jsonl"):
        data.DataSource("hub").load(resolve_config("qasper"))


def test_hub_extraction_is_atomic(tmp_path, monkeypatch):
    """A rank reading while another extracts sees no file or the whole file, never a partial one."""
    import os
    import zipfile

    import huggingface_hub

    archive = tmp_path / "data.zip"
    lines = "".join(json.dumps(dict(V1, _id=f"x{i}")) + "\n" for i in range(50))
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/trec.jsonl", lines)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: str(archive))
    target = tmp_path / "extracted" / "trec.jsonl"
    renames = []
    real_replace = os.replace

    def watch(src, dst):
        assert not Path(dst).exists() and Path(src).read_text() == lines  # complete before it appears
        renames.append((Path(src).parent, Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(data.os, "replace", watch)
    assert len(data.DataSource("hub").load(resolve_config("trec"))) == 50
    assert renames == [(target.parent, target)]
    assert sorted(p.name for p in target.parent.iterdir()) == ["trec.jsonl"]  # no temporary file left
