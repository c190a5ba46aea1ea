"""Protocol details on a tiny random-weight Llama: SAMSum stop ids, question-agnostic compression,
both passes of v2 chain-of-thought, the data source decided by rank 0, completeness in result.json,
truncation lengths from model2maxlen.json, and `kvpress compare` offline while the hub answers."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from kvpress import PrunedCache
from kvpress.longbench import generate as gen
from kvpress.longbench import prompts, runner
from kvpress.longbench.data import DataSource
from kvpress.longbench.results import score_run
from kvpress.longbench.store import RunStore
from kvpress.longbench.tasks import parse_task_list, tasks


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from kvpress.models import load_model

    return load_model(str(tiny_model_dir))


def test_samsum_stops_on_tokenizer_eos_and_newline_only(tiny):
    model, tokenizer = tiny
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    try:
        # official pred.py: eos_token_id=[tokenizer.eos_token_id, tokenizer.encode("\n", ...)[-1]] for samsum
        assert gen.stop_token_ids(model, tokenizer, True) == [tokenizer.eos_token_id, newline]
        assert gen.stop_token_ids(model, tokenizer, False) == [tokenizer.eos_token_id, 7]  # generation config
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def _hotpot_input(tokenizer):
    task = tasks()["hotpotqa"]
    record = {"context": " ".join(f"passage word {i}." for i in range(120)), "input": "Which word comes last?",
              "answers": ["x"], "length": 1, "_id": "h"}
    return prompts.encode(tokenizer, prompts.build_prompt(task, record), task=task, max_length=None,
                          tail=prompts.context_tail(task, record))


def test_context_mode_with_the_full_cache_changes_nothing(tiny):
    model, tokenizer = tiny
    encoded = _hotpot_input(tokenizer)
    assert encoded.context_end is not None
    settings = gen.GenerationSettings(max_new_tokens=12)
    whole = gen.generate(model, tokenizer, encoded.input_ids, settings, lambda: PrunedCache(None))
    split = gen.generate(model, tokenizer, encoded.input_ids, settings, lambda: PrunedCache(None),
                         context_end=encoded.context_end)
    assert split.text == whole.text and split.new_tokens == whole.new_tokens
    assert split.cache.tokens_seen == whole.cache.tokens_seen


def test_context_is_compressed_before_the_question_is_seen(tiny):
    from kvpress.policies import SnapKV

    model, tokenizer = tiny
    encoded = _hotpot_input(tokenizer)
    ids = torch.tensor([encoded.input_ids])
    cache = PrunedCache(SnapKV(budget=0.5, window=8, kernel=3), config=model.config)
    with torch.inference_mode():
        gen.prefill_context(model, ids, encoded.context_end, cache)
    report = cache.report()
    assert all(row.seen == encoded.context_end for row in report.layers)  # no question token seen yet
    assert all(row.kept < encoded.context_end * 0.5 + 2 for row in report.layers)  # evicted already
    out = gen.generate(model, tokenizer, encoded.input_ids, gen.GenerationSettings(max_new_tokens=4),
                       lambda: PrunedCache(SnapKV(budget=0.5, window=8, kernel=3), config=model.config),
                       context_end=encoded.context_end)
    assert out.cache.tokens_seen == len(encoded.input_ids) + out.new_tokens - 1


@pytest.mark.parametrize("question_agnostic", [False, True])
def test_kvzip_runs_through_the_harness_with_its_reconstruction(tiny, question_agnostic):
    from kvpress.policies import KVzip

    model, tokenizer = tiny
    encoded = _hotpot_input(tokenizer)
    context_end = encoded.context_end if question_agnostic else None
    caches = []

    def make_cache():
        caches.append(PrunedCache(KVzip(budget=0.3), config=model.config))
        return caches[-1]

    out = gen.generate(model, tokenizer, encoded.input_ids, gen.GenerationSettings(max_new_tokens=4), make_cache,
                       context_end=context_end)
    layer = caches[0].layers[0]
    assert layer.seen == len(encoded.input_ids) + out.new_tokens - 1
    compressed = context_end if question_agnostic else len(encoded.input_ids) - 1
    # global allocation: layers and heads differ, their mean holds the budget (plus what came after it)
    layers = caches[0].pruned_layers()
    mean = sum(int(layer.valid.sum()) for layer in layers) / sum(layer.num_heads for layer in layers)
    assert mean <= 0.3 * compressed + len(encoded.input_ids) - compressed + out.new_tokens
    # the reconstruction scored every compressed slot (a plain forward would have raised at decoding)
    assert int(layer.score_state().prompt_tokens.max()) == compressed


def _v2_folder(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    records = [{"_id": "v0", "domain": "Single-Document QA", "sub_domain": "x", "difficulty": "easy",
                "length": "short", "question": "Which letter?", "choice_A": "a", "choice_B": "b", "choice_C": "c",
                "choice_D": "d", "answer": "A", "context": "word " * 80}]
    folder = tmp_path / "v2data"
    folder.mkdir()
    (folder / "data.json").write_text(json.dumps(records))
    return folder


def test_v2_cot_records_both_passes(tiny, tmp_path):
    model, tokenizer = tiny
    settings = runner.RunSettings(model="tiny", tasks=["v2"], v2_max_length=200, data="dir", v2_template="0shot_cot")
    assert runner.run(settings, parse_task_list("v2"), DataSource("dir", str(_v2_folder(tmp_path))), model,
                      tokenizer, lambda: PrunedCache(None), tmp_path / "out", progress=False)
    record = json.loads((tmp_path / "out" / "predictions" / "v2.jsonl").read_text())
    cot, answer = record["passes"]["cot"], record["passes"]["answer"]
    for diag in (cot, answer):
        for key in ("prompt_tokens", "input_tokens", "new_tokens", "seconds", "kv_bytes", "kv_slots_kept"):
            assert diag[key] is not None, key
    source = json.loads((_v2_folder(tmp_path / "again") / "data.json").read_text())[0]
    first = prompts.build_v2_prompt(source, "0shot_cot")
    second = prompts.build_v2_prompt(source, "0shot_cot_ans", cot=record["cot"])
    assert cot["prompt_tokens"] == prompts.count_tokens(tokenizer, first)
    assert answer["prompt_tokens"] == prompts.count_tokens(tokenizer, second)
    assert record["seconds"] == pytest.approx(cot["seconds"] + answer["seconds"], abs=1e-3)
    assert record["new_tokens"] == cot["new_tokens"] + answer["new_tokens"]
    assert record["kv_bytes"] == max(cot["kv_bytes"], answer["kv_bytes"])
    # DynamicCache's bytes for the same tokens, from the model's shape (the last new token is never fed)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * model.dtype.itemsize
    for diag in (cot, answer):
        assert diag["kv_bytes_dynamic"] == (diag["input_tokens"] + diag["new_tokens"] - 1) * per_token
        assert diag["kv_bytes"] >= diag["kv_bytes_dynamic"]  # the no-op cache holds every token (and slot metadata)
    assert record["kv_bytes_dynamic"] == max(cot["kv_bytes_dynamic"], answer["kv_bytes_dynamic"])


def test_context_mode_is_recorded_and_refuses_the_other_mode(tiny, tmp_path):
    model, tokenizer = tiny
    configs = parse_task_list("passage_count")
    base = {"model": "tiny", "tasks": ["passage_count"], "data": "sample", "limit": 1, "max_length": 7500}
    assert runner.run(runner.RunSettings(**base, compress="context"), configs, DataSource("sample"), model,
                      tokenizer, None, tmp_path, progress=False)
    header = json.loads((tmp_path / "run.json").read_text())
    assert header["config"]["compress"] == "context" and "question-agnostic" in header["metadata"]["compression"]
    record = json.loads((tmp_path / "predictions" / "passage_count.jsonl").read_text())
    assert 0 < record["context_tokens"] < record["input_tokens"]
    with pytest.raises(ValueError, match="compress: 'context' .* vs 'question' now"):
        runner.run(runner.RunSettings(**base), configs, DataSource("sample"), model, tokenizer, None, tmp_path,
                   progress=False)
    with pytest.raises(ValueError, match="unknown --compress mode 'both'; accepted: question, context"):
        runner.Predictor(model, tokenizer, runner.RunSettings(**dict(base, compress="both")), None)


def test_scoring_keeps_dataset_ids_and_reports_completeness(tmp_path):
    store = RunStore(tmp_path)
    store.write_header({"config": {"policy": "full", "tasks": ["passage_count", "lcc"]}, "metadata": {}})
    store.write_dataset_ids({"passage_count": ["a", "b", "c"], "lcc": ["a"]})
    rows = {"passage_count": [("a", "3"), ("b", "3"), ("stranger", "0")], "lcc": [("a", "x")]}
    for task, preds in rows.items():
        path = store.task_path(task)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"_id": i, "pred": p, "answers": ["3"] if task != "lcc" else ["x"],
                                            "all_classes": None}) + "\n" for i, p in preds))
    result = score_run(tmp_path)
    assert result["passage_count"] == 100.0  # the prediction of an id outside the data is not scored
    done = result["completeness"]
    assert not done["complete"] and done["tasks"]["passage_count"] == {"predicted": 2, "dataset": 3, "official": 200}
    assert done["suites"]["v1"] == {"predicted": 3, "official": 4750, "complete": False}
    assert "passage_count: 1 sample(s) of the data not predicted yet" in done["notes"]
    assert "v1: 3 of the official 4750 samples" in done["notes"]
    assert not done["official_data"] and "lcc: the data holds 1 records, the official set 500" in done["notes"]


def test_official_suite_sizes_match_the_task_table():
    from kvpress.longbench.results import official_count

    assert sum(official_count(c.name) for c in parse_task_list("all")) == 4750
    assert sum(official_count(c.name) for c in parse_task_list("e")) == 3668
    assert official_count("v2") == 503


def test_non_main_rank_takes_the_data_source_of_rank_0(tiny_model_dir, tmp_path, monkeypatch):
    """A worker never resolves the source itself: whatever its own view, it uses what rank 0 sent."""
    import argparse

    from kvpress.longbench import data, distributed
    from kvpress.longbench.prepare import prepare

    (tmp_path / "passage_count.jsonl").write_text(
        (data.sample_dir() / "passage_count.jsonl").read_text().splitlines()[0] + "\n")

    class Worker(distributed.Shard):
        def broadcast(self, value):
            assert value is None  # rank 1 has nothing to offer
            return ("dir", str(tmp_path))

        def barrier(self):
            pass

    monkeypatch.setattr(distributed.Shard, "from_env", classmethod(lambda cls: Worker(rank=1, world=2)))
    monkeypatch.setattr(data, "resolve_source", lambda *a: pytest.fail("a worker resolved the data source"))
    args = argparse.Namespace(data="auto", data_dir=None, tasks="passage_count", max_length=500, limit=None,
                              model=str(tiny_model_dir), device="cpu", dtype="auto", attn_implementation="sdpa",
                              no_progress=True)
    prep = prepare(args)
    assert prep.source == DataSource("dir", str(tmp_path)) and len(prep.records["passage_count"]) == 1


def test_truncation_length_from_model2maxlen(capsys):
    from kvpress.longbench.prepare import resolve_max_length

    assert resolve_max_length(None, "mistralai/Mistral-7B-Instruct-v0.2", "hub")[0] == 31500
    assert resolve_max_length(None, "/models/Meta-Llama-3-8B-Instruct/", "dir")[0] == 7950
    assert resolve_max_length(None, "THUDM/chatglm2-6b", "dir")[0] == 31500
    assert resolve_max_length(4000, "mistralai/Mistral-7B-Instruct-v0.2", "hub") == (4000, "--max-length")
    assert resolve_max_length(None, "smollm2", "sample") == (7500, "bundled-sample default")
    with pytest.raises(ValueError, match="--max-length is required with real data for model 'org/unknown-7b'"):
        resolve_max_length(None, "org/unknown-7b", "dir")


class _Connection:
    def close(self):
        pass


def _offline(*args, **kwargs):
    raise OSError("network unreachable")


@pytest.mark.parametrize("network", ["answers", "unreachable"])
def test_compare_uses_the_bundled_sample_online_and_offline(tiny_model_dir, tmp_path, monkeypatch, capsys, network):
    """Whether huggingface.co answers or not, `kvpress compare` uses the bundled sample and needs no
    --max-length; the full cache is added as the reference of the fidelity scores."""
    import huggingface_hub

    from kvpress import cli

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", (lambda *a, **k: _Connection()) if network == "answers" else _offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **k: pytest.fail("compare used the hub"))
    out = tmp_path / "compare"
    assert cli.main(["compare", "--model", str(tiny_model_dir), "--tasks", "passage_count,lcc", "--limit", "1",
                     "--policy", "snapkv:budget=0.5,window=8", "--compress", "question,context", "--workers", "1",
                     "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| run | score | fidelity | identical % | KV bytes vs DynamicCache | generation s |" in printed
    for label in ("| full |", "| snapkv:budget=0.5,window=8 |", "| snapkv:budget=0.5,window=8 [context] |"):
        assert label in printed
    for name in ("compare.md", "compare.csv"):
        assert (out / name).is_file()
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    full = json.loads((out / "full" / "run.json").read_text())
    assert full["config"]["data"] == "sample" and full["metadata"]["max_length_source"] == "bundled-sample default"
    result = json.loads((out / "snapkv-budget=0.5-window=8-context" / "result.json").read_text())
    assert result["fidelity"]["reference"] == str(out / "full") and result["fidelity"]["avg"] is not None
    assert result["run"]["config"]["compress"] == "context"


def test_bad_compare_options_name_the_argument(capsys):
    from kvpress import cli
    from kvpress.longbench.compare import compare_specs

    with pytest.raises(SystemExit):
        cli.main(["compare", "--compress", "everything"])
    assert "--compress takes question or context" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["longbench", "--max-length", "0"])
    assert "--max-length must be an integer >= 1, got '0'" in capsys.readouterr().err
    assert compare_specs(["snapkv:budget=0.2", "full"]) == ["full", "snapkv:budget=0.2"]
    assert compare_specs(["h2o:budget=0.5", "h2o:budget=0.5"]) == ["full", "h2o:budget=0.5"]
    assert compare_specs(["snapkv:budget=0.5+kvquant:bits=4"])[0] == "full"  # quantized is not the reference


def test_v2_limit_is_not_taken_from_max_length():
    import argparse

    from kvpress.longbench.command import add_run_options

    parser = argparse.ArgumentParser()
    add_run_options(parser)
    args = parser.parse_args(["--tasks", "en16,v2", "--max-length", "31500"])
    assert args.max_length == 31500 and args.v2_max_length == runner.V2_MAX_LENGTH == 120000
    assert parser.parse_args(["--v2-max-length", "64000"]).v2_max_length == 64000
    assert runner.RunSettings(model="m").v2_max_length == 120000
