"""LongBench records from one of three sources.

* ``dir``: a folder of the official JSON-lines files, ``<dir>/<config>.jsonl`` or
  ``<dir>/data/<config>.jsonl`` (v2: ``data.json``, a JSON list, or ``v2.jsonl``);
* ``hub``: the Hugging Face hub through ``huggingface_hub`` -- ``data.zip`` of ``THUDM/LongBench``
  (the loading script is never used) and ``data.json`` of ``THUDM/LongBench-v2``;
* ``sample``: the small bundled set in ``data/`` (LongBench-format, built by ``build_sample.py``).

The default (``auto``) is ``dir`` when a folder is given, otherwise the bundled sample: the data source
never depends on whether the network answers. The hub is used only when asked for (``--data hub``).
A malformed line raises :class:`DataError` naming file and line.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .tasks import Config

V1_REPO = "THUDM/LongBench"
V2_REPO = "THUDM/LongBench-v2"
V1_KEYS = ("input", "context", "answers", "length", "_id")
V2_KEYS = ("_id", "question", "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context",
           "difficulty", "length")
SOURCES = ("auto", "hub", "dir", "sample")


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line)."""


def sample_dir() -> Path:
    """Folder of the bundled sample set."""
    return Path(str(resources.files(__package__).joinpath("data")))


def sample_tasks() -> list[str]:
    """Configuration names present in the bundled sample, in a stable order."""
    return sorted(p.stem for p in sample_dir().glob("*.jsonl"))


def _check(record, keys: tuple[str, ...], where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{where}: record lacks the field(s) {', '.join(missing)}")
    if "answers" in keys and not isinstance(record["answers"], list):
        raise DataError(f"{where}: 'answers' must be a list of strings")
    return record


def read_jsonl(path: str | Path, keys: tuple[str, ...] = ()) -> list[dict]:
    """Parse a JSON-lines file; blank lines are skipped; errors name the file and the line."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
            records.append(_check(record, keys, f"{path}:{number}"))
    return records


def read_json_list(path: str | Path, keys: tuple[str, ...]) -> list[dict]:
    """Parse a JSON file holding a list of records (the LongBench v2 ``data.json``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    return [_check(r, keys, f"{path}: record {i}") for i, r in enumerate(data)]


def unique_ids(records: list[dict]) -> list[dict]:
    """Give repeated ``_id`` values a ``#k`` suffix so every record has its own key."""
    seen: dict[str, int] = {}
    for record in records:
        key = str(record["_id"])
        count = seen.get(key, 0)
        seen[key] = count + 1
        record["_id"] = key if count == 0 else f"{key}#{count}"
    return records


def load_from_dir(directory: str | Path, config: Config) -> list[dict]:
    """Records of ``config`` from a local folder of official files."""
    directory = Path(directory)
    if config.is_v2:
        for name in ("data.json", "v2.json"):
            for path in (directory / name, directory / "data" / name):
                if path.is_file():
                    return unique_ids(read_json_list(path, V2_KEYS))
        candidates = [directory / "v2.jsonl", directory / "data" / "v2.jsonl"]
    else:
        candidates = [directory / f"{config.name}.jsonl", directory / "data" / f"{config.name}.jsonl"]
    for path in candidates:
        if path.is_file():
            return unique_ids(read_jsonl(path, V2_KEYS if config.is_v2 else V1_KEYS))
    raise DataError(f"no file for task {config.name!r} in {directory}: looked for "
                    + ", ".join(str(p) for p in candidates))


def _hub_file(repo: str, filename: str) -> str:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DataError("the hub source needs huggingface_hub: pip install 'kvprune[hub]'") from None
    try:
        return hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset")
    except Exception as err:  # noqa: BLE001 -- network, auth or missing file: say what failed
        raise DataError(f"cannot download {filename} from the hub dataset {repo}: {err}") from None


def load_from_hub(config: Config) -> list[dict]:
    """Records of ``config`` from the hub (v1/E from ``data.zip``, v2 from ``data.json``)."""
    if config.is_v2:
        return unique_ids(read_json_list(_hub_file(V2_REPO, "data.json"), V2_KEYS))
    archive = _hub_file(V1_REPO, "data.zip")
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.namelist() if m.split("/")[-1] == f"{config.name}.jsonl"]
        if not members:
            raise DataError(f"{archive} holds no {config.name}.jsonl")
        target = Path(archive).parent / "extracted" / f"{config.name}.jsonl"
        if not target.is_file():
            _write_atomically(target, zf.read(members[0]))
    return unique_ids(read_jsonl(target, V1_KEYS))


def _write_atomically(target: Path, payload: bytes) -> None:
    """Write to a temporary file of this process, then rename: a reader (another rank) sees either no
    file or the whole file, never a partial one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, target)


@dataclass(frozen=True)
class DataSource:
    """Where records come from: ``kind`` is ``hub``, ``dir`` or ``sample``; ``path`` for ``dir``."""

    kind: str
    path: str | None = None

    def describe(self) -> str:
        return f"dir:{self.path}" if self.kind == "dir" else self.kind

    def load(self, config: Config) -> list[dict]:
        if self.kind == "hub":
            return load_from_hub(config)
        if self.kind == "dir":
            return load_from_dir(self.path, config)
        if config.name not in sample_tasks():
            raise ValueError(f"task {config.name!r} is not in the bundled sample; accepted: "
                             f"{', '.join(sample_tasks())} (give --data-dir or --data hub for the others)")
        return load_from_dir(sample_dir(), config)


def resolve_source(kind: str = "auto", data_dir: str | None = None) -> DataSource:
    """Pick the data source; ``auto`` means ``--data-dir`` if given, else the bundled sample. The
    network is never consulted: the hub is used only when ``kind`` is ``"hub"``."""
    if kind not in SOURCES:
        raise ValueError(f"unknown data source {kind!r}; accepted: {', '.join(SOURCES)}")
    if data_dir is not None and kind in ("auto", "dir"):
        if not Path(data_dir).is_dir():
            raise DataError(f"--data-dir {data_dir} is not a folder")
        return DataSource("dir", str(Path(data_dir).resolve()))
    if data_dir is not None:
        raise ValueError(f"--data-dir cannot be combined with --data {kind}; accepted: --data auto or dir")
    if kind == "dir":
        raise ValueError("--data dir needs --data-dir FOLDER")
    return DataSource("sample" if kind == "auto" else kind)
