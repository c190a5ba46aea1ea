"""The prediction loop on a tiny random-weight Llama: files, resume, refusal of a changed
configuration, 2-process sharding with torchrun, and the end-to-end command on the bundled sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvpress.longbench import runner
from kvpress.longbench.data import DataSource
from kvpress.longbench.results import score_run, write_reports
from kvpress.longbench.store import ConfigMismatch, RunStore
from kvpress.longbench.tasks import parse_task_list

DATA = Path(__file__).parent / "data"
TASKS = "hotpotqa,trec,samsum,lcc,multifieldqa_zh,hotpotqa_e"
MAX_LENGTH = 96


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """synthetic_sample.jsonl split into official per-config files (E records into hotpotqa_e)."""
    folder = tmp_path_factory.mktemp("lb-data")
    groups: dict[str, list[str]] = {}
    for line in (DATA / "synthetic_sample.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            name = record["dataset"] + ("_e" if record["_id"].startswith("synthetic-e") else "")
            groups.setdefault(name, []).append(line)
    (folder / "data").mkdir()
    for name, lines in groups.items():
        (folder / "data" / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from kvpress.models import load_model

    return load_model(str(tiny_model_dir))


def settings(**changes) -> runner.RunSettings:
    base = {"model": "tiny", "tasks": TASKS.split(","), "max_length": MAX_LENGTH, "data": "dir"}
    base.update(changes)
    return runner.RunSettings(**base)


def do_run(tiny, data_dir, out, stop_after=None, **changes):
    model, tokenizer = tiny
    from transformers import DynamicCache

    return runner.run(settings(**changes), parse_task_list(TASKS), DataSource("dir", str(data_dir)), model,
                      tokenizer, lambda: DynamicCache(config=model.config), out, progress=False,
                      stop_after=stop_after)


def predictions(out: Path) -> dict[str, list[dict]]:
    """Prediction files without the timing field (the only one that may differ between runs)."""
    files = sorted((out / "predictions").glob("*.jsonl"))
    return {p.name: [{k: v for k, v in r.items() if k != "seconds"} for r in map(json.loads, p.read_text().splitlines())]
            for p in files}


@pytest.fixture(scope="module")
def reference_run(tiny, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    assert do_run(tiny, data_dir, out)
    return out


def test_run_writes_header_predictions_and_diagnostics(reference_run):
    header = json.loads((reference_run / "run.json").read_text())
    assert header["config"]["max_length"] == MAX_LENGTH and header["config"]["chat_template"] == "official"
    assert header["metadata"]["versions"]["transformers"]
    preds = predictions(reference_run)
    assert set(preds) == {f"{t}.jsonl" for t in TASKS.split(",")}
    assert len(preds["hotpotqa_e.jsonl"]) == 4
    record = preds["hotpotqa.jsonl"][0]
    for key in ("_id", "pred", "answers", "all_classes", "length", "prompt_tokens", "truncated_tokens",
                "truncated", "input_tokens", "templated", "new_tokens", "kv_slots_kept", "kv_bytes"):
        assert key in record
    assert record["truncated"] and record["truncated_tokens"] <= MAX_LENGTH + 3 and record["templated"]
    assert not preds["lcc.jsonl"][0]["templated"]  # code completion is fed raw
    assert all(r["new_tokens"] <= 32 for r in preds["hotpotqa.jsonl"])
    assert all(r["new_tokens"] >= 1 for r in preds["samsum.jsonl"])  # min_length = prompt + 1


def test_samsum_stops_at_newline(reference_run):
    for record in predictions(reference_run)["samsum.jsonl"]:
        assert "\n" not in record["pred"][:-1]


def test_score_table_and_e_buckets(reference_run):
    result = score_run(reference_run)
    table = write_reports(reference_run, result)
    assert set(result["hotpotqa_e"]) == {"0-4k", "4-8k", "8k+"}
    rows = {r["task"]: r for r in result["rows"]}
    assert rows["lcc"]["metric"] == "code_sim_score" and rows["hotpotqa"]["samples"] == 1
    assert rows["hotpotqa"]["kv_slots_kept"] > 0 and rows["hotpotqa"]["kv_bytes"] > 0
    for name in ("results.md", "results.csv", "result.json"):
        assert (reference_run / name).is_file()
    assert "| task | metric | score | 0-4k | 4-8k | 8k+ | samples | prompt_tokens |" in table
    csv_header = (reference_run / "results.csv").read_text().splitlines()[0]
    assert csv_header.startswith("task,metric,score,")


def test_interrupted_then_resumed_equals_uninterrupted(tiny, data_dir, reference_run, tmp_path):
    assert not do_run(tiny, data_dir, tmp_path, stop_after=1)  # one sample per task, then "killed"
    partial = predictions(tmp_path)
    assert sum(len(v) for v in partial.values()) == len(partial)
    # a torn line left by a kill mid-write is dropped, never glued to the next record
    with open(tmp_path / "predictions" / "hotpotqa_e.jsonl", "a") as handle:
        handle.write('{"_id": "synthetic-e-')
    assert do_run(tiny, data_dir, tmp_path)
    resumed = predictions(tmp_path)
    assert resumed == predictions(reference_run)
    for records in resumed.values():
        ids = [r["_id"] for r in records]
        assert len(ids) == len(set(ids))


def test_run_killed_midway_by_an_exception_resumes_with_nothing_lost_and_no_duplicate(
        tiny, data_dir, reference_run, tmp_path, monkeypatch):
    """A generation that raises after 6 samples (a Ctrl-C, an out-of-memory error) stops the run; the
    rerun keeps every line already written, byte for byte, and ends equal to an uninterrupted run."""
    real, calls = runner.generate, []

    def generation_killed_after_six(*args, **kwargs):
        if len(calls) == 6:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "generate", generation_killed_after_six)
    with pytest.raises(KeyboardInterrupt):
        do_run(tiny, data_dir, tmp_path)
    written = {path.name: path.read_text() for path in (tmp_path / "predictions").glob("*.jsonl")}
    assert sum(text.count("\n") for text in written.values()) == 6
    resumed_calls = []
    monkeypatch.setattr(runner, "generate", lambda *a, **k: resumed_calls.append(1) or real(*a, **k))
    assert do_run(tiny, data_dir, tmp_path)
    total = sum(len(records) for records in predictions(reference_run).values())
    assert len(resumed_calls) == total - 6  # no sample predicted twice
    for name, text in written.items():  # nothing already written lost or rewritten
        assert (tmp_path / "predictions" / name).read_text().startswith(text), name
    resumed = predictions(tmp_path)
    assert resumed == predictions(reference_run)
    for records in resumed.values():
        ids = [r["_id"] for r in records]
        assert len(ids) == len(set(ids))


def test_rerun_of_a_finished_run_predicts_nothing(tiny, data_dir, reference_run):
    before = predictions(reference_run)
    assert do_run(tiny, data_dir, reference_run)
    assert predictions(reference_run) == before


def test_changed_configuration_is_refused(tiny, data_dir, reference_run):
    with pytest.raises(ConfigMismatch, match=r"max_length: 96 .* vs 200 now"):
        do_run(tiny, data_dir, reference_run, max_length=200)


def test_broken_prediction_line_names_file_and_line(tmp_path):
    store = RunStore(tmp_path)
    path = store.task_path("trec")
    path.parent.mkdir(parents=True)
    path.write_text('{"_id": "a"}\nnot json\n{"_id": "b"}\n')
    with pytest.raises(ValueError, match=r"trec.jsonl:2"):
        store.load("trec")


def _cli_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _cli(args: list[str], launcher: list[str] | None = None, timeout: int = 300):
    cmd = (launcher or [sys.executable, "-m", "kvpress.longbench"]) + args
    done = subprocess.run(cmd, capture_output=True, text=True, env=_cli_env(), timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_two_process_torchrun_equals_one_process(tiny_model_dir, data_dir, reference_run, tmp_path):
    args = ["--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--tasks", TASKS,
            "--max-length", str(MAX_LENGTH), "--no-progress", "--out", str(tmp_path / "sharded")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(_free_port()), "-m", "kvpress.longbench"]
    done = _cli(args, launcher)
    assert "| hotpotqa |" in done.stdout
    sharded = predictions(tmp_path / "sharded")
    assert not list((tmp_path / "sharded" / "predictions").glob("*.rank*.jsonl"))  # merged by rank 0
    # the in-process reference used a DynamicCache, the CLI a PrunedCache(None) (or DynamicCache):
    # predictions and prompts must agree; cache byte counts may not
    strip = lambda d: {k: [{f: v for f, v in r.items() if f != "kv_bytes"} for r in rs] for k, rs in d.items()}
    assert strip(sharded) == strip(predictions(reference_run))


def _free_port() -> int:
    from kvpress.longbench.distributed import free_port

    return free_port()


def test_end_to_end_command_on_the_bundled_sample(tiny_model_dir, tmp_path):
    out = tmp_path / "e2e"
    done = _cli(["--model", str(tiny_model_dir), "--data", "sample", "--limit", "1", "--no-progress",
                 "--out", str(out)])
    for task in ("lcc", "passage_count", "passage_retrieval_en", "multifieldqa_en"):
        assert f"| {task} |" in done.stdout
    assert (out / "results.md").read_text().startswith("| task | metric | score | samples |")


def test_end_to_end_with_an_eviction_policy(tiny_model_dir, tmp_path):
    out = tmp_path / "snapkv"
    _cli(["--model", str(tiny_model_dir), "--data", "sample", "--limit", "1", "--no-progress",
          "--tasks", "passage_count", "--policy", "snapkv:budget=64,window=8", "--out", str(out)])
    rows = json.loads((out / "result.json").read_text())["rows"]
    assert rows[0]["kv_slots_kept"] < rows[0]["prompt_tokens"]


def test_local_workers_option_shards_and_merges(tiny_model_dir, tmp_path):
    out = tmp_path / "workers"
    _cli(["--model", str(tiny_model_dir), "--data", "sample", "--tasks", "passage_count", "--limit", "2",
          "--workers", "2", "--no-progress", "--out", str(out)])
    ids = [json.loads(line)["_id"] for line in (out / "predictions" / "passage_count.jsonl").read_text().splitlines()]
    assert ids == [f"sample-passage_count-{i:02d}" for i in range(2)]


def test_longbench_v2_run_and_breakdown(tiny, tmp_path):
    records = [{"_id": f"v{i}", "domain": "Single-Document QA", "sub_domain": "x", "difficulty": d, "length": n,
                "question": "Which letter?", "choice_A": "a", "choice_B": "b", "choice_C": "c", "choice_D": "d",
                "answer": "A", "context": "word " * 80} for i, (d, n) in enumerate([("easy", "short"), ("hard", "long")])]
    folder = tmp_path / "v2data"
    folder.mkdir()
    (folder / "data.json").write_text(json.dumps(records))
    model, tokenizer = tiny
    out = tmp_path / "v2run"
    assert runner.run(runner.RunSettings(model="tiny", tasks=["v2"], v2_max_length=64, data="dir"),
                      parse_task_list("v2"), DataSource("dir", str(folder)), model, tokenizer, None, out,
                      progress=False)
    preds = predictions(out)["v2.jsonl"]
    assert [p["_id"] for p in preds] == ["v0", "v1"]
    assert all(p["templated"] and p["truncated"] and p["new_tokens"] <= 128 for p in preds)
    result = score_run(out)
    assert set(result["v2"]) >= {"overall", "easy", "hard", "short", "medium", "long", "unanswered"}
    assert result["v2"]["samples"] == 2 and result["rows"][0]["metric"] == "accuracy"


def test_after_prompt_append_holds_every_generated_token_and_older_headers_still_resume(tiny, data_dir, tmp_path):
    from kvpress import PrunedCache
    from kvpress.policies import SnapKV

    model, tokenizer = tiny
    configs = parse_task_list("hotpotqa")
    source = DataSource("dir", str(data_dir))
    held = {}
    for mode in ("evict", "append"):
        run_settings = settings(tasks=["hotpotqa"], after_prompt=mode, limit=1)
        assert runner.run(run_settings, configs, source, model, tokenizer,
                          lambda mode=mode: PrunedCache(SnapKV(budget=16, window=4), after_prompt=mode),
                          tmp_path / mode, progress=False)
        record = json.loads((tmp_path / mode / "predictions" / "hotpotqa.jsonl").read_text().splitlines()[0])
        held[mode] = record
    assert held["evict"]["kv_slots_kept"] == 16
    # the compressed prompt (16 slots per head) and every generated token fed back (all but the last)
    assert held["append"]["kv_slots_kept"] == 16 + held["append"]["new_tokens"] - 1
    # a folder written before the setting existed resumes as the default ("evict"), nothing regenerated
    header_path = tmp_path / "evict" / "run.json"
    header = json.loads(header_path.read_text())
    del header["config"]["after_prompt"]
    header_path.write_text(json.dumps(header))

    def no_generation():
        raise AssertionError("a finished run was generated again")

    assert runner.run(settings(tasks=["hotpotqa"], limit=1), configs, source, model, tokenizer, no_generation,
                      tmp_path / "evict", progress=False)
    with pytest.raises(ConfigMismatch, match="after_prompt: 'evict'"):
        runner.run(settings(tasks=["hotpotqa"], limit=1, after_prompt="append"), configs, source, model,
                   tokenizer, no_generation, tmp_path / "evict", progress=False)
