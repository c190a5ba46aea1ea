"""LongBench harness: LongBench v1, LongBench-E and LongBench v2 with any kvpress cache policy.

Modules, one job each:

* ``tasks``    -- the task table, loaded from the JSON files in ``config/`` (tasks are data)
* ``data``     -- records from the Hugging Face hub, a folder of official jsonl files, or the bundled sample
* ``prompts``  -- official prompt templates, middle truncation in tokens, chat-template rules
* ``generate`` -- one greedy generation per sample with a fresh cache, plus cache statistics
* ``metrics``  -- the official metric functions (quirks included)
* ``scoring``  -- post-processing, task scores, LongBench-E buckets, v2 accuracy, averages
* ``runner``   -- resumable, sharded prediction loop writing append-only JSONL
* ``store``    -- the files of a run folder
* ``fidelity`` -- each task's metric with the full cache's predictions as references
* ``results``  -- result.json (with completeness), markdown and CSV tables, the ``compare`` tables
* ``plot``     -- score-vs-budget, KV-bytes-vs-score and the ``compare`` figure
* ``progress`` -- one progress bar over the prediction files of every worker
* ``prepare``  -- what a run needs besides the policy: process group, data source, records, model
* ``evaluate`` -- one policy: predict into a run folder, score it, write and print its reports
* ``compare``  -- several policies against the full cache: compare.md, compare.csv, compare.png
* ``command``  -- the command lines ``longbench [run|score|plot]`` and ``compare``: options, workers,
  dispatch (``kvpress.cli`` and ``python -m kvpress.longbench`` call it; nothing here imports the command)

The exact protocol (prompts, truncation, generation lengths, metrics, aggregation) is the one of the
official THUDM/LongBench code; ``docs/longbench.md`` in the repository states it, lists the
deviations and shows how to reproduce a published number.
"""
