"""Progress over images: a rich bar (rate, ETA) on a terminal, plain log lines elsewhere (CI, logs)."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("pipeline")


class _Plain:
    def __init__(self, total: int, every_s: float = 0.0):
        self.total, self.done, self.start, self.every_s = total, 0, time.perf_counter(), every_s

    def advance(self, n: int, label: str) -> None:
        self.done += n
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        log.info("[%d/%d] %s  %.2f img/s  ETA %.0fs", self.done, self.total, label, rate, eta)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Rich:
    def __init__(self, total: int):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._progress = Progress(
            TextColumn("[bold]images"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.2f} img/s"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), TextColumn("{task.fields[label]}"),
        )
        self._task = self._progress.add_task("images", total=total, rate=0.0, label="")
        self._start = time.perf_counter()
        self._done = 0

    def advance(self, n: int, label: str) -> None:
        self._done += n
        rate = self._done / max(time.perf_counter() - self._start, 1e-9)
        self._progress.update(self._task, advance=n, rate=rate, label=label)

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)


class _Silent(_Plain):
    def advance(self, n: int, label: str) -> None:
        self.done += n


def progress(total: int, mode: str = "auto"):
    if mode == "none":
        return _Silent(total)
    if mode == "rich" or (mode == "auto" and sys.stdout.isatty()):
        return _Rich(total)
    return _Plain(total)
