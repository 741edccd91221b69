"""SIGINT/SIGTERM during a run: stop at a safe point instead of dying mid-write.

While a run holds `StopSignals`, the first SIGINT or SIGTERM only records the signal; the run acts on it at the
next safe point: the next denoising step (`step_end`, a diffusers callback_on_step_end), the next batch, or right away where nothing is being written
(`immediate()`: reading the manifest, waiting for the folder lock, loading the model). An image being saved is
therefore saved completely (PNG, sidecar, index line) or not at all; a batch still denoising is dropped. The run
then writes run.json (`interrupted`) and raises pipeline.errors.RunInterrupted, which the command line turns into
exit status 128 + signal number without a traceback.

Handlers are installed for the duration of one run only (in the main thread; elsewhere Python cannot install
them, and a Ctrl-C arrives as KeyboardInterrupt, which the runner treats as SIGINT) and the previous ones are
restored afterwards: tests and sweeps run several jobs in one process. A signal that arrives too late to stop the
run (while it writes its final run.json) is not lost: the runner raises RunInterrupted after finishing.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Optional

log = logging.getLogger("pipeline")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stop(BaseException):
    """Raised inside a run at a safe point once a stop signal arrived. A BaseException, so the batch loop's
    `except Exception` (job.on_error=skip) does not count it as a failed batch."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """Context manager: catch SIGINT/SIGTERM for one run (see the module docstring)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.acted = False  # a Stop was raised for it
        self._immediate = 0
        self._previous: dict[int, Any] = {}

    # -- installation ---------------------------------------------------------------------------------------
    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    @property
    def unhandled(self) -> Optional[int]:
        """A signal that came after the run's last safe point (while it wrote its final run.json), if any."""
        return self.signum if self.signum is not None and not self.acted else None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            log.warning("%s again: already stopping, please wait for run.json to be written", signal_name(signum))
            return
        self.signum = signum
        if self._immediate:
            self._immediate = 0  # raise once; cleanup after it must not be cut short by a second signal
            self.acted = True
            raise Stop(signum)
        log.warning("%s received: stopping at the next safe point (the finished images are kept)", signal_name(signum))

    # -- safe points ----------------------------------------------------------------------------------------
    def check(self) -> None:
        """A safe point: raise Stop if a signal arrived."""
        if self.signum is not None:
            self.acted = True
            raise Stop(self.signum)

    def step_end(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        """A diffusers `callback_on_step_end` (for generate_batch's on_step): stop after the step in progress."""
        self.check()
        return callback_kwargs

    @contextmanager
    def immediate(self) -> Iterator[None]:
        """A stretch that writes nothing: a signal stops it at once rather than at the next safe point."""
        self.check()
        self._immediate += 1
        try:
            yield
        finally:
            self._immediate = max(0, self._immediate - 1)
