"""Write files so that a run killed at any instant leaves only complete files behind; read the JSON ones back."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path` (atomic on POSIX)."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object written here (run.json, a sidecar, a rank's part), or None if missing, unreadable or not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def append_line(path: Path, line: str) -> None:
    """Append one line with a single write on an O_APPEND file, so lines never interleave or split."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: Path) -> int:
    """Delete temp files a killed run left behind; they are never complete outputs."""
    removed = 0
    for p in folder.glob(f"*{TMP_MARK}*"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed
