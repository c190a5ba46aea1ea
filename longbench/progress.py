"""One progress bar of the samples predicted by every worker process, read from the prediction files.

Workers append one flushed line per sample (``store.PredictionWriter``), so the files are the shared
state: a thread of rank 0 counts their complete lines about once a second. Nothing is sent between
processes, and the count is right after a resume too (samples predicted earlier are counted at once).
"""

from __future__ import annotations

import threading
from pathlib import Path

from .store import RunStore


class FileProgress:
    """A tqdm bar over ``jobs``: (run folder, task, samples expected) triples."""

    def __init__(self, jobs: list[tuple[str | Path, str, int]], desc: str = "samples", enabled: bool = True,
                 interval: float = 1.0):
        self.jobs = [(RunStore(folder), task, total) for folder, task, total in jobs]
        self.total = sum(total for _, _, total in jobs)
        self.desc, self.enabled, self.interval = desc, enabled, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None

    def done(self) -> int:
        """Samples predicted so far, each task capped at its expected count."""
        return sum(min(total, store.count_lines(task)) for store, task, total in self.jobs)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._refresh()

    def _refresh(self) -> None:
        done = self.done()
        if done != self._bar.n:
            self._bar.n = done
            self._bar.refresh()

    def __enter__(self) -> FileProgress:  # noqa: PYI034
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit="sample", dynamic_ncols=True)
            self._thread = threading.Thread(target=self._loop, name="kvpress-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._refresh()
            self._bar.close()
