"""One run at a time per output folder: `<out>/.lock`, held with fcntl.flock for the whole run.

Two runs writing into one folder would both make every image and both append to index.jsonl. The second run
refuses (OutputLocked, naming the holder) or, with job.wait_for_lock=SECONDS, polls until the folder is free.

The kernel drops a flock when its process ends in any way (kill -9, a crash, the machine's power aside), so a
lock file left behind by a dead process is simply taken over: the file's existence means nothing, only the flock
does. The file holds the holder's pid, host and start time for the message, rewritten in place (never replaced:
the lock belongs to the open file, a new inode would be a second lock) and emptied on release. It is never deleted,
because deleting a lock file races with another run that has just opened it.

Across machines: flock on NFS is emulated with POSIX byte-range locks by Linux NFS clients (v4, or v3 with a
working lockd) and can be unreliable or absent on other servers and clients; on such shared file systems two
machines may both get the lock. A holder on another host is said so in the message, and run.json records the
host of each run, so such a clash is at least visible.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from pipeline.errors import PipelineError

LOCK_FILE = ".lock"
log = logging.getLogger("pipeline")


class OutputLocked(PipelineError):
    """Another run holds the output folder."""

    def __init__(self, folder: Path, holder: dict[str, Any], waited_s: float = 0.0):
        self.folder, self.holder, self.waited_s = folder, holder, waited_s
        waited = f" (still in use after waiting {waited_s:g} s)" if waited_s > 0 else ""
        super().__init__(
            f"output folder {folder} is in use by another run ({describe_holder(holder)}){waited}; wait for it, "
            "use another job.output_dir, or set job.wait_for_lock=SECONDS to wait"
        )


def describe_holder(holder: dict[str, Any]) -> str:
    """`pid 1234 on host h, started 2024-...`, saying so when the host is another machine."""
    if not holder.get("pid"):
        return "holder unknown: it has only just started"
    host = holder.get("host") or "?"
    where = f"pid {holder['pid']} on host {host}"
    if host != socket.gethostname():
        where += " (another machine)"
    if holder.get("started_at"):
        where += f", started {holder['started_at']}"
    return where


def read_holder(folder: Path) -> dict[str, Any]:
    """What the lock file says about its holder ({} if empty or unreadable)."""
    try:
        data = json.loads((Path(folder) / LOCK_FILE).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class FolderLock:
    """`with FolderLock(folder, wait_s):` holds the folder for the block; raises OutputLocked if it cannot."""

    def __init__(self, folder: Path, wait_s: float = 0.0, poll_s: float = 0.2):
        self.folder, self.wait_s, self.poll_s = Path(folder), wait_s, poll_s
        self.path = self.folder / LOCK_FILE
        self._fd: Optional[int] = None
        self._locked = False

    def acquire(self) -> "FolderLock":
        start = time.monotonic()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while not self._try_lock():
                waited = time.monotonic() - start
                if waited >= self.wait_s:
                    raise OutputLocked(self.folder, read_holder(self.folder), self.wait_s)
                time.sleep(min(self.poll_s, self.wait_s - waited))
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(info) + "\n").encode(), 0)
        except BaseException:  # refused, or interrupted while waiting
            self.release()
            raise
        return self

    def _try_lock(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._locked = True
            return True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                log.warning("cannot lock output folder %s (%s): this file system has no flock; make sure no other "
                            "run writes into it", self.folder, os.strerror(e.errno))
                return True
            raise

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._locked:
                os.ftruncate(fd, 0)  # no holder any more (the file stays: see the module docstring)
        except OSError:
            pass
        finally:
            self._locked = False
            os.close(fd)  # closing the last descriptor of the open file drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FolderLock":
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
