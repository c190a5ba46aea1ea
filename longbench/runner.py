"""The generic prediction loop: for each task, each sample of this rank's share not yet predicted,
build the official prompt, generate with a fresh cache and append the prediction to the run folder.

The runner knows nothing task-specific: prompts, lengths and metrics come from the ``Task`` data. It
is driven by :class:`RunSettings` (everything that defines the protocol, stored in ``run.json`` and
compared on rerun) and a ``make_cache`` factory (a fresh cache per sample).
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import prompts
from .data import DataSource
from .distributed import Shard
from .generate import GenerationSettings, generate
from .metrics import CODE_SIM_BACKEND
from .scoring import extract_v2_answer, score_sample
from .store import PredictionWriter, RunStore
from .tasks import Config

V2_MAX_NEW_TOKENS = 128
V2_COT_MAX_NEW_TOKENS = 1024
V2_MAX_LENGTH = 120000  # the official v2 limit for 128k-context models
COMPRESS_MODES = ("question", "context")


@dataclass
class RunSettings:
    """Everything that defines a run's protocol; two runs with equal settings are interchangeable."""

    model: str
    policy: str = "full"
    policy_resolved: str = "full"
    tasks: list[str] = field(default_factory=list)
    max_length: int | None = None     # v1 and LongBench-E tasks
    v2_max_length: int | None = V2_MAX_LENGTH
    chat_template: str = "official"
    data: str = "sample"
    limit: int | None = None
    min_new_tokens_all: bool = False   # SnapKV/PyramidKV protocol: min_length = prompt + 1 everywhere
    v2_template: str = "0shot"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    decoding: str = "greedy"
    compress: str = "question"         # "context": the context is compressed before the question is seen
    after_prompt: str = "evict"        # "append": the prompt is compressed once, generated tokens appended

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def library_versions() -> dict[str, str]:
    """Versions of the packages that can change predictions or scores."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("kvprune", "torch", "transformers", "rouge", "jieba", "fuzzywuzzy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


COMPRESSION_TEXT = {
    "question": "question-aware: the whole prompt is prefilled, then the policy evicts",
    "context": "question-agnostic: the prompt up to the end of the context is prefilled and the policy "
               "evicts; the rest (question, instructions, answer cue) is then fed on the compressed cache",
}


def build_header(settings: RunSettings, tokenizer, extra: dict | None = None) -> dict:
    """The content of ``run.json``: the configuration (compared on rerun) and descriptive metadata."""
    meta = {
        "chat_template_hash": prompts.template_hash(tokenizer),
        "metric_backend_code_sim": CODE_SIM_BACKEND,
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "compression": COMPRESSION_TEXT[settings.compress],
    }
    meta.update(extra or {})
    return {"config": settings.as_dict(), "metadata": meta}


class Predictor:
    """Turns one record into one prediction record for a configuration."""

    def __init__(self, model, tokenizer, settings: RunSettings, make_cache: Callable[[], object] | None):
        if settings.compress not in COMPRESS_MODES:
            raise ValueError(f"unknown --compress mode {settings.compress!r}; accepted: {', '.join(COMPRESS_MODES)}")
        self.model, self.tokenizer, self.settings, self.make_cache = model, tokenizer, settings, make_cache

    def _run(self, prompt: str, task, max_new_tokens: int, stop_at_newline: bool = False,
             tail: str | None = None):
        max_length = self.settings.max_length if task is not None else self.settings.v2_max_length
        split = self.settings.compress == "context"
        encoded = prompts.encode(self.tokenizer, prompt, task=task, max_length=max_length,
                                 chat_template=self.settings.chat_template, tail=tail if split else None)
        # the official code sets min_length = prompt + 1 for the newline-stopped task (SAMSum)
        min_new = 1 if (stop_at_newline or self.settings.min_new_tokens_all) else 0
        gen = generate(self.model, self.tokenizer, encoded.input_ids,
                       GenerationSettings(max_new_tokens, stop_at_newline, min_new), self.make_cache,
                       context_end=encoded.context_end)
        return encoded, gen

    def _diagnostics(self, encoded, gen) -> dict:
        out = {
            "prompt_tokens": encoded.raw_tokens, "truncated_tokens": encoded.truncated_tokens,
            "truncated": encoded.truncated, "input_tokens": len(encoded.input_ids),
            "templated": encoded.templated, "new_tokens": gen.new_tokens, "seconds": round(gen.seconds, 4),
            "kv_slots_kept": gen.cache.slots_kept if gen.cache else None,
            "kv_tokens_seen": gen.cache.tokens_seen if gen.cache else None,
            "kv_bytes": gen.cache.bytes if gen.cache else None,
            "kv_bytes_dynamic": gen.cache.dynamic_bytes if gen.cache else None,
        }
        if self.settings.compress == "context":
            # None: no split found (tail longer than half of max_length), run question-aware
            out["context_tokens"] = encoded.context_end
        return out

    def predict(self, config: Config, record: dict) -> dict:
        if config.is_v2:
            return self._predict_v2(record)
        task = config.task
        encoded, gen = self._run(prompts.build_prompt(task, record), task, task.max_new_tokens,
                                 task.stop_at_newline, prompts.context_tail(task, record))
        out = {"_id": record["_id"], "pred": gen.text, "answers": record["answers"],
               "all_classes": record.get("all_classes"), "length": record["length"]}
        out.update(self._diagnostics(encoded, gen))
        return out

    def _predict_v2(self, record: dict) -> dict:
        template = self.settings.v2_template
        extra = {}
        if template == "0shot_cot":
            encoded, first = self._run(prompts.build_v2_prompt(record, "0shot_cot"), None, V2_COT_MAX_NEW_TOKENS,
                                       tail=prompts.v2_context_tail(record, "0shot_cot"))
            cot_pass = self._diagnostics(encoded, first)
            # the answer pass omits the document: nothing to compress before the question
            encoded, gen = self._run(prompts.build_v2_prompt(record, "0shot_cot_ans", cot=first.text), None,
                                     V2_MAX_NEW_TOKENS)
            answer_pass = self._diagnostics(encoded, gen)
            extra = {"cot": first.text, "passes": {"cot": cot_pass, "answer": answer_pass}}
        else:
            encoded, gen = self._run(prompts.build_v2_prompt(record, template), None, V2_MAX_NEW_TOKENS,
                                     tail=prompts.v2_context_tail(record, template))
        out = {"_id": record["_id"], "pred": gen.text, "answer": record["answer"],
               "judge": extract_v2_answer(gen.text), "difficulty": record["difficulty"],
               "length": record["length"], "domain": record.get("domain"),
               "sub_domain": record.get("sub_domain")}
        out.update(self._diagnostics(encoded, gen))
        if "passes" in extra:  # both passes' work: time and tokens add up, memory is the larger one
            passes = extra["passes"].values()
            out["seconds"] = round(sum(p["seconds"] for p in passes), 4)
            out["new_tokens"] = sum(p["new_tokens"] for p in passes)
            for key in ("kv_bytes", "kv_bytes_dynamic"):
                sizes = [p[key] for p in passes if p.get(key) is not None]
                out[key] = max(sizes) if sizes else None
        out.update(extra)
        return out


def running_score(config: Config, record: dict) -> float:
    """Score of one prediction record (0..1), for the progress bar."""
    if config.is_v2:
        return float(record.get("judge") == record["answer"])
    return score_sample(config.task, record["pred"], record["answers"], record.get("all_classes")).score


def _progress(total: int, initial: int, desc: str, position: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="sample", position=position,
                disable=not enabled, dynamic_ncols=True, leave=True)


def predict_task(predictor: Predictor, config: Config, records: list[dict], store: RunStore,
                 shard: Shard, progress: bool = True, stop_after: int | None = None, offset: int = 0) -> int:
    """Predict this rank's unfinished share of ``records``; returns the number of new predictions.
    ``stop_after`` ends the loop after that many new samples (used to test interrupted runs); ``offset``
    is the number of samples of the run's earlier tasks (see ``Shard.take``)."""
    mine = shard.take(records, offset)
    done = store.done_ids(config.name)
    todo = [r for r in mine if r["_id"] not in done]
    finished = [r for r in store.load(config.name) if r["_id"] in {m["_id"] for m in mine}]
    scores = [running_score(config, r) for r in finished]
    desc = config.name if shard.world == 1 else f"{config.name} [rank {shard.rank}]"
    written = 0
    with _progress(len(mine), len(mine) - len(todo), desc, shard.rank, progress) as bar, \
            PredictionWriter(store.shard_path(config.name, shard.rank, shard.world)) as writer:
        for record in todo:
            if stop_after is not None and written >= stop_after:
                break
            result = predictor.predict(config, record)
            writer.write(result)
            written += 1
            scores.append(running_score(config, result))
            bar.set_postfix(score=f"{100 * sum(scores) / len(scores):.2f}")
            bar.update(1)
    return written


def load_records(configs: list[Config], source: DataSource, limit: int | None = None) -> dict[str, list[dict]]:
    """Every configuration's records from ``source`` (the first ``limit`` of each when given)."""
    out = {}
    for config in configs:
        records = source.load(config)
        out[config.name] = records[:limit] if limit is not None else records
    return out


def run(settings: RunSettings, configs: list[Config], source: DataSource, model, tokenizer,
        make_cache: Callable[[], object] | None, out_dir, shard: Shard | None = None,
        progress: bool = True, header_extra: dict | None = None, stop_after: int | None = None,
        records: dict[str, list[dict]] | None = None) -> bool:
    """Run every configuration into ``out_dir``; rank 0 merges the shards. ``records`` (config name ->
    records) skips loading from ``source``. Returns True on rank 0 when the run is complete (every
    sample of every task predicted)."""
    shard = shard or Shard()
    store = RunStore(out_dir)
    header = build_header(settings, tokenizer, header_extra)
    exists = store.check_header(header["config"], defaults=RunSettings(model=settings.model).as_dict())  # every rank refuses a mismatching folder
    if records is None:
        records = load_records(configs, source, settings.limit)
    orders = {config.name: [r["_id"] for r in records[config.name]] for config in configs}
    if shard.is_main:
        if not exists:
            store.write_header(header)
        store.write_dataset_ids(orders)
    shard.barrier()
    predictor = Predictor(model, tokenizer, settings, make_cache)
    offset = 0
    for config in configs:
        predict_task(predictor, config, records[config.name], store, shard, progress, stop_after, offset)
        offset += len(records[config.name])
    shard.barrier()
    if not shard.is_main:
        return False
    complete = True
    for config in configs:
        merged = store.merge(config.name, orders[config.name])
        complete &= {r["_id"] for r in merged} >= set(orders[config.name])
    return complete
