"""Run-folder files: a torn last line is cut off in place, dataset ids, line counts for progress."""

from __future__ import annotations

import json
import os

from kvpress.longbench.store import PredictionWriter, RunStore, _drop_torn_tail


def test_torn_tail_is_truncated_in_place(tmp_path):
    path = tmp_path / "p.jsonl"
    complete = "".join(json.dumps({"_id": str(i), "pred": "x" * 50}) + "\n" for i in range(3000))  # > 64 KiB
    path.write_text(complete + '{"_id": "torn", "pr')
    inode = os.stat(path).st_ino
    _drop_torn_tail(path, chunk=4096)
    assert path.read_text() == complete
    assert os.stat(path).st_ino == inode  # the same file, cut, not a rewritten copy


def test_torn_tail_without_any_complete_line_empties_the_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"_id": "a", "pr')
    _drop_torn_tail(path, chunk=4)
    assert path.read_text() == ""
    path.write_text('{"_id": "a"}\n')
    _drop_torn_tail(path)
    assert path.read_text() == '{"_id": "a"}\n'


def test_writer_appends_after_cutting_a_torn_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"_id": "a"}\n{"_id": "b')
    with PredictionWriter(path) as writer:
        writer.write({"_id": "b"})
    assert [json.loads(line)["_id"] for line in path.read_text().splitlines()] == ["a", "b"]


def test_line_counts_cover_rank_files(tmp_path):
    store = RunStore(tmp_path)
    for rank in range(2):
        with PredictionWriter(store.shard_path("trec", rank, 2)) as writer:
            for i in range(rank + 2):
                writer.write({"_id": f"{rank}-{i}"})
    assert store.count_lines("trec") == 5 and store.count_lines("lcc") == 0
    store.write_dataset_ids({"trec": ["a", "b"]})
    assert store.read_dataset_ids() == {"trec": ["a", "b"]}


def test_shared_progress_counts_every_workers_lines_capped_per_task(tmp_path):
    from kvpress.longbench.progress import FileProgress

    store = RunStore(tmp_path / "a")
    for rank in range(2):
        with PredictionWriter(store.shard_path("trec", rank, 2)) as writer:
            writer.write({"_id": str(rank)})
    with PredictionWriter(RunStore(tmp_path / "b").task_path("trec")) as writer:
        for i in range(5):
            writer.write({"_id": str(i)})
    progress = FileProgress([(tmp_path / "a", "trec", 3), (tmp_path / "b", "trec", 4), (tmp_path / "c", "lcc", 2)],
                            enabled=False)
    assert progress.total == 9 and progress.done() == 2 + 4
