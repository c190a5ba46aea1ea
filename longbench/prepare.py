"""Everything a run needs besides the policy, loaded once per command: the process group, the data
source (chosen by rank 0), the tasks, the records, the truncation length, the model and tokenizer."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from . import data, distributed
from .runner import load_records
from .tasks import known_max_length, parse_task_list

DEFAULT_SAMPLE_MAX_LENGTH = 7500


@dataclass
class Prepared:
    """Everything a run needs besides the policy: data, tasks, records, model, tokenizer, shard."""

    source: object
    configs: list
    records: dict
    model: object
    tokenizer: object
    shard: object
    max_length: int | None
    max_length_source: str
    dtype: str


def resolve_max_length(given: int | None, model: str, source_kind: str) -> tuple[int, str]:
    """The v1 truncation length: --max-length, else the model's entry in model2maxlen.json, else the
    bundled sample's default; real data with an unknown model needs --max-length."""
    if given is not None:
        return given, "--max-length"
    known = known_max_length(model)
    if known is not None:
        return known
    if source_kind == "sample":
        return DEFAULT_SAMPLE_MAX_LENGTH, "bundled-sample default"
    raise ValueError(f"--max-length is required with real data for model {model!r} (not in model2maxlen.json): "
                     "e.g. 3500 for 4k-context models, 7500 for 8k, 31500 for 32k (the official head-room of "
                     "500 tokens)")


def choose_device(name: str, local_rank: int) -> str:
    """``--device``: ``auto`` is ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    import torch

    if name != "auto":
        return name
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def choose_dtype(name: str, device: str) -> str:
    """``--dtype``: ``auto`` is float32 on CPU, bfloat16 elsewhere."""
    return ("float32" if device == "cpu" else "bfloat16") if name == "auto" else name


def prepare(args) -> Prepared:
    """Join the process group, let rank 0 pick the data source and send it to every rank, load the
    records (rank 0 first: it downloads and extracts hub files once) and the model. ``args`` holds the
    run options (``longbench.command.add_run_options``)."""
    import torch

    from kvpress.models import load_model

    shard = distributed.Shard.from_env()
    try:
        decided = data.resolve_source(args.data, args.data_dir) if shard.is_main else None
        source = data.DataSource(*shard.broadcast(None if decided is None else (decided.kind, decided.path)))
        if shard.is_main and source.kind == "sample" and args.data == "auto":
            print("kvpress: using the bundled LongBench sample (give --data-dir FOLDER or --data hub for the "
                  "official data)", file=sys.stderr)
        configs = parse_task_list(args.tasks or (",".join(data.sample_tasks()) if source.kind == "sample" else "all"))
        max_length, max_length_source = resolve_max_length(args.max_length, args.model, source.kind)
        records = load_records(configs, source, args.limit) if shard.is_main else None
        shard.barrier()
        if records is None:
            records = load_records(configs, source, args.limit)
        device = choose_device(args.device, shard.local_rank)
        dtype = choose_dtype(args.dtype, device)
        model, tokenizer = load_model(args.model, dtype=getattr(torch, dtype),
                                      attn_implementation=args.attn_implementation, device=device,
                                      progress=not args.no_progress)
    except BaseException:
        shard.close()
        raise
    return Prepared(source, configs, records, model, tokenizer, shard, max_length, max_length_source, dtype)
