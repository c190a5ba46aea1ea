"""The files of a run folder.

::

    OUT/run.json                        header: the run's full configuration plus metadata
    OUT/dataset_ids.json                the ``_id`` of every record of each task, in dataset order
    OUT/predictions/<task>.jsonl        predictions, one JSON object per line, keyed by ``_id``
    OUT/predictions/<task>.rank<r>.jsonl  a rank's share while a sharded run is in progress
    OUT/result.json, results.md, results.csv   scores (written by ``report``)

Predictions are appended and flushed one sample at a time, so a killed run loses at most the sample
in flight; a torn last line is dropped on the next start. Rerunning skips every ``_id`` found in the
task's files; a different configuration in the same folder is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .data import DataError

HEADER = "run.json"
DATASET_IDS = "dataset_ids.json"
PRED_DIR = "predictions"


class ConfigMismatch(ValueError):
    """The run folder holds a run made with another configuration."""


def read_predictions(path: Path) -> list[dict]:
    """Records of a prediction file. A torn final line (killed mid-write) is ignored; any other bad
    line raises ``DataError`` with file and line."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # last line, no newline after it: an interrupted write
                continue
            raise DataError(f"{path}:{number}: invalid JSON in predictions ({err.msg})") from None
    return records


class RunStore:
    """Reads and writes one run folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def header_path(self) -> Path:
        return self.root / HEADER

    def read_header(self) -> dict | None:
        if not self.header_path.is_file():
            return None
        try:
            return json.loads(self.header_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{self.header_path}:{err.lineno}: invalid JSON ({err.msg})") from None

    def check_header(self, config: dict, defaults: dict | None = None) -> bool:
        """True if the folder has a header; raise ``ConfigMismatch`` if its configuration differs. A
        setting the header lacks (a run written before the setting existed) counts as its default."""
        header = self.read_header()
        if header is None:
            return False
        old = {**(defaults or {}), **header.get("config", {})}
        diffs = [f"  {k}: {old.get(k)!r} in {self.header_path} vs {config.get(k)!r} now"
                 for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k)]
        if diffs:
            raise ConfigMismatch(
                f"{self.root} already holds a run with another configuration:\n" + "\n".join(diffs)
                + "\nUse another --out folder, or delete this one to start over."
            )
        return True

    def write_header(self, header: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.header_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(header, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(self.header_path)

    def write_dataset_ids(self, ids: dict[str, list[str]]) -> None:
        """Record which records the run's data holds; scoring keeps only predictions of these ids."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / DATASET_IDS
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(ids, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)

    def read_dataset_ids(self) -> dict[str, list[str]] | None:
        """The ids written by :meth:`write_dataset_ids`; None for a folder without them."""
        path = self.root / DATASET_IDS
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None

    def count_lines(self, task: str) -> int:
        """Complete lines in the task's prediction files (a cheap count of predictions for progress)."""
        total = 0
        for path in self.task_files(task):
            try:
                with open(path, "rb") as handle:
                    total += sum(block.count(b"\n") for block in iter(lambda h=handle: h.read(1 << 20), b""))
            except FileNotFoundError:  # merged away between the listing and the open
                continue
        return total

    def task_path(self, task: str) -> Path:
        return self.root / PRED_DIR / f"{task}.jsonl"

    def shard_path(self, task: str, rank: int, world: int) -> Path:
        """Where a rank appends: the task file itself for a single process, a rank file otherwise."""
        return self.task_path(task) if world == 1 else self.root / PRED_DIR / f"{task}.rank{rank}.jsonl"

    def task_files(self, task: str) -> list[Path]:
        """The merged file first, then any rank files left by a sharded run."""
        rank_files = sorted((self.root / PRED_DIR).glob(f"{task}.rank*.jsonl"))
        return [self.task_path(task)] + [p for p in rank_files if p.stem[len(task) + 5:].isdigit()]

    def done_ids(self, task: str) -> set[str]:
        return {r["_id"] for path in self.task_files(task) for r in read_predictions(path)}

    def load(self, task: str) -> list[dict]:
        """Every prediction of a task (merged file and rank files), first occurrence of each ``_id``."""
        seen, out = set(), []
        for path in self.task_files(task):
            for record in read_predictions(path):
                if record["_id"] not in seen:
                    seen.add(record["_id"])
                    out.append(record)
        return out

    def merge(self, task: str, order: list[str]) -> list[dict]:
        """Fold rank files into ``<task>.jsonl`` in dataset order (ids not in ``order`` go last)."""
        records = self.load(task)
        position = {key: i for i, key in enumerate(order)}
        records.sort(key=lambda r: position.get(r["_id"], len(position)))
        path = self.task_path(task)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        tmp.replace(path)
        for extra in self.task_files(task)[1:]:
            extra.unlink()
        return records


class PredictionWriter:
    """Appends records to a prediction file, one flushed (and fsynced) line per sample."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(path)
        self.path = path
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 -- held for the whole task

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> PredictionWriter:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_torn_tail(path: Path, chunk: int = 1 << 16) -> None:
    """Cut a file back to its last complete line, so appends never glue onto a torn record. The file
    is truncated in place (never rewritten), so a kill during this step loses nothing else."""
    if not path.is_file():
        return
    with open(path, "rb+") as handle:
        end = handle.seek(0, os.SEEK_END)
        if end == 0:
            return
        handle.seek(end - 1)
        if handle.read(1) == b"\n":
            return
        position = end
        while position > 0:  # scan backwards for the last newline
            start = max(0, position - chunk)
            handle.seek(start)
            block = handle.read(position - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                handle.truncate(start + newline + 1)
                return
            position = start
        handle.truncate(0)
