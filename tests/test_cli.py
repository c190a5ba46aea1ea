"""The `kvpress` command: policy listing, clear errors for bad input."""

from __future__ import annotations

from dataclasses import dataclass

from kvpress import cli


@dataclass
class Demo:
    """Demo policy for the listing."""

    budget: int | float = 0.25
    window: int = 32


@dataclass
class Wrap:
    """Demo wrapper."""

    inner: object
    alpha: float = 1.0


def test_policies_listing_shows_parameters_and_defaults():
    text = cli.describe_policies({"demo": Demo, "wrap": Wrap})
    assert "demo  [Demo]  Demo policy for the listing." in text
    assert "    budget: int | float = 0.25" in text and "    window: int = 32" in text
    assert "wrap(<policy>)  [Wrap]" in text and "    alpha: float = 1.0" in text
    assert "inner" not in text


def test_policies_command_lists_the_registry(capsys):
    from kvpress.policies import REGISTRY as registry

    assert cli.main(["policies"]) == 0
    out = capsys.readouterr().out
    for name in registry:
        assert out.count(f"\n{name}") + out.startswith(name) >= 1


def test_unknown_command(capsys):
    assert cli.main(["benchmark"]) == 2
    assert "accepted: longbench, policies, compare" in capsys.readouterr().err


def test_unknown_task_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["longbench", "--tasks", "qasperr", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "unknown LongBench task 'qasperr'" in err and "qasper" in err


def test_unknown_policy_is_a_clear_error_before_loading_a_model(capsys):
    assert cli.main(["longbench", "--policy", "snapkvv:budget=3"]) == 2
    assert "unknown policy 'snapkvv'" in capsys.readouterr().err
    assert cli.main(["compare", "--policy", "h2o:budgett=3"]) == 2
    assert "unknown parameter 'budgett'" in capsys.readouterr().err


def test_real_data_requires_max_length(tmp_path, capsys):
    (tmp_path / "trec.jsonl").write_text("")
    assert cli.main(["longbench", "--data-dir", str(tmp_path), "--tasks", "trec"]) == 2
    assert "--max-length is required" in capsys.readouterr().err


def test_help_is_plain_usage(capsys):
    for argv in ([], ["--help"], ["-h"]):
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: kvpress COMMAND")
        for command in ("compare", "longbench score DIR", "longbench plot DIR", "policies", "torchrun"):
            assert command in out
        assert "``" not in out and "::" not in out and ":data:" not in out  # no reStructuredText markup


def test_documents_the_package_points_to_exist():
    from pathlib import Path

    import kvpress.longbench

    assert "docs/longbench.md" in kvpress.longbench.__doc__
    assert (Path(__file__).parents[1] / "docs" / "longbench.md").is_file()


def test_ranks_share_a_run_round_robin_across_tasks():
    from kvpress.longbench.distributed import Shard

    tasks = [list(range(3)), list(range(3, 6)), list(range(6, 9)), list(range(9, 12))]  # 4 tasks x 3 records
    for world in (2, 3, 5):
        shares = [[] for _ in range(world)]
        for rank in range(world):
            offset = 0
            for items in tasks:
                shares[rank] += Shard(rank, world).take(items, offset)
                offset += len(items)
        assert sorted(i for share in shares for i in share) == list(range(12))  # every sample exactly once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1            # balanced over the run
        assert all(share == [i for i in range(12) if i % world == r] for r, share in enumerate(shares))



def test_longbench_never_imports_the_command():
    """The command sits on top: no module of the LongBench harness imports ``kvpress.cli``."""
    import ast
    from pathlib import Path

    import kvpress.longbench

    for path in sorted(Path(kvpress.longbench.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                package = ["kvpress", "longbench"][: 3 - node.level] if node.level else []
                base = ".".join([*package, *([node.module] if node.module else [])])
                names = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            assert not [n for n in names if n == "kvpress.cli" or n.startswith("kvpress.cli.")], path.name


def test_a_model_path_that_does_not_exist_is_a_clear_error(capsys, tmp_path):
    missing = str(tmp_path / "no-such-model")
    assert cli.main(["longbench", "--model", missing, "--limit", "1", "--tasks", "passage_count", "--no-progress",
                     "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"model: no such folder {missing!r}" in err and "smollm2" in err and "Traceback" not in err


def test_no_progress_hides_the_loading_bars(tmp_path, capfd, monkeypatch):
    """`load_model(progress=False)` (what `--no-progress` passes): no "Loading weights" bar from
    transformers and no plain tqdm bar (what the GGUF reader writes while converting), while errors
    still surface."""
    import types

    import pytest
    import tqdm
    import transformers
    from tiny_models import tiny_model

    from kvpress import models

    tiny_model("llama", "sdpa").save_pretrained(tmp_path / "tiny")

    def tokenizer(*args, **kwargs):  # stands for a conversion: a plain tqdm bar on stderr
        for _ in tqdm.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors"):
            pass
        return types.SimpleNamespace(pad_token="<pad>")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    for progress in (True, False):
        models.load_model(str(tmp_path / "tiny"), progress=progress)
        err = capfd.readouterr().err
        assert ("Converting and de-quantizing" in err) == progress, err
        assert ("Loading weights" in err) == progress, err
    assert transformers.utils.logging.is_progress_bar_enabled()
    with pytest.raises(FileNotFoundError, match="no such folder"):
        models.load_model(str(tmp_path / "missing"), progress=False)
