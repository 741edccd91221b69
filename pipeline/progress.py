"""Progress over images: a rich bar (rate, ETA) on a terminal, plain log lines elsewhere (CI, logs).

Within a batch the bar also shows denoising steps (`bar.step(done, total)`; `step_callback` reports them
from diffusers' `callback_on_step_end`): a second bar line on a terminal, a plain log line at most every
`step_every_s` seconds elsewhere, so one large image is not minutes of silence. `ItemLog` is the plain
`[3/12] what (elapsed, ETA)` line for long loops outside a run (benchmarks, calibration, quantization).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Optional

log = logging.getLogger("pipeline")

STEP_EVERY_S = 5.0  # plain mode: at most one step line this often


class _Steps:
    """Step timing within one pipeline call: a new call starts when `done` does not grow."""

    def __init__(self, clock: Callable[[], float]):
        self.clock, self.last_done, self.first_at = clock, 0, None

    def update(self, done: int) -> Optional[float]:
        """Record step `done`; seconds per step measured since the call's first step (None until two)."""
        now = self.clock()
        if done <= self.last_done or self.first_at is None:
            self.first_at, self.first_done = now, done
        self.last_done = done
        return (now - self.first_at) / (done - self.first_done) if done > self.first_done else None

    def reset(self) -> None:
        self.last_done, self.first_at = 0, None


class _Plain:
    def __init__(self, total: int, every_s: float = 0.0, step_every_s: float = STEP_EVERY_S,
                 clock: Callable[[], float] = time.perf_counter):
        self.total, self.done, self.every_s, self.clock = total, 0, every_s, clock
        self.start = clock()
        self.step_every_s, self._steps, self._step_logged = step_every_s, _Steps(clock), self.start

    def advance(self, n: int, label: str) -> None:
        self.done += n
        elapsed = self.clock() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        log.info("[%d/%d] %s  %.2f img/s  ETA %.0fs", self.done, self.total, label, rate, eta)
        self._steps.reset()
        self._step_logged = self.clock()

    def step(self, done: int, total: int, label: str = "") -> None:
        """Denoising step `done` of `total` in the current call: a log line at most every step_every_s."""
        per_step = self._steps.update(done)
        now = self.clock()
        if now - self._step_logged < self.step_every_s or done >= total:
            return  # the batch's own line follows the last step
        self._step_logged = now
        timing = f"  {per_step:.2f} s/step  ETA {per_step * (total - done):.0f}s" if per_step else ""
        log.info("[%d/%d]   step %d/%d%s%s", self.done, self.total, done, total, timing,
                 f"  {label}" if label else "")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Rich:
    def __init__(self, total: int, console=None):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._progress = Progress(
            TextColumn("[bold]{task.description:<6}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), TextColumn("{task.fields[label]}"), console=console,
        )
        self._task = self._progress.add_task("images", total=total, rate="0.00 img/s", label="")
        self._step_task = self._progress.add_task("steps", total=1, rate="", label="", visible=False)
        self._start = time.perf_counter()
        self._done = 0
        self._steps = _Steps(time.perf_counter)

    def advance(self, n: int, label: str) -> None:
        self._done += n
        rate = self._done / max(time.perf_counter() - self._start, 1e-9)
        self._progress.update(self._task, advance=n, rate=f"{rate:.2f} img/s", label=label)
        self._steps.reset()

    def step(self, done: int, total: int, label: str = "") -> None:
        """Denoising step `done` of `total` in the current call: the second bar line."""
        new_call = done <= self._steps.last_done
        per_step = self._steps.update(done)
        if new_call or done == 1:
            self._progress.reset(self._step_task, total=total, completed=0, visible=True)
        self._progress.update(self._step_task, completed=done, total=total, label=label,
                              rate=f"{per_step:.2f} s/step" if per_step else "")

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)


class _Silent(_Plain):
    def advance(self, n: int, label: str) -> None:
        self.done += n

    def step(self, done: int, total: int, label: str = "") -> None:
        pass


def progress(total: int, mode: str = "auto", step_every_s: float = STEP_EVERY_S):
    if mode == "none":
        return _Silent(total)
    if mode == "rich" or (mode == "auto" and sys.stdout.isatty()):
        return _Rich(total)
    return _Plain(total, step_every_s=step_every_s)


StepCallback = Callable[[Any, int, Any, dict], dict]


def step_callback(bar, total_steps: Optional[int] = None, also: Optional[StepCallback] = None,
                  label: str = "") -> StepCallback:
    """A diffusers `callback_on_step_end` that reports each finished step to `bar` (`bar.step(i + 1, total)`),
    then calls `also` (another callback, e.g. an interrupt check) with the same arguments and returns what it
    returns. `total_steps` None: the pipeline's own count (`pipe._num_timesteps`, set before its loop).

    A diffusers PipelineCallback given as `also` keeps working, but the pipeline only reads its
    `tensor_inputs` from the object it is given: pass `callback_on_step_end_tensor_inputs` yourself then."""

    def callback(pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        total = total_steps or getattr(pipe, "_num_timesteps", None) or step_index + 1
        bar.step(step_index + 1, total, label)
        if also is None:
            return callback_kwargs
        out = also(pipe, step_index, timestep, callback_kwargs)
        return callback_kwargs if out is None else out

    return callback


def _stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class ItemLog:
    """One flushed line per item of a long loop: `[3/12] label  (41.2 s, ETA 123 s)`.

    For scripts and jobs without a bar (benchmarks, calibration, quantization); `emit` takes the line
    (default: stderr, so a script's stdout stays its table or JSON; `log.info` inside the pipeline)."""

    def __init__(self, total: int, emit: Callable[[str], None] = _stderr_line,
                 clock: Callable[[], float] = time.perf_counter):
        self.total, self.done, self.emit, self.clock = total, 0, emit, clock
        self.start = clock()

    def __call__(self, label: str) -> str:
        """Count one finished item and emit its line (returned too)."""
        self.done += 1
        elapsed = self.clock() - self.start
        eta = f", ETA {elapsed / self.done * (self.total - self.done):.0f} s" if self.done < self.total else ""
        line = f"[{self.done}/{self.total}] {label}  ({elapsed:.1f} s{eta})"
        self.emit(line)
        return line
