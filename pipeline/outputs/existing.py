"""What a run finds in its output folder: finished images, ones it would replace, and index.jsonl.

A finished image is a `<stem>.png` whose sidecar `<stem>.json` exists and names it (the sidecar is written after
the PNG, so its presence means the PNG is complete). A planned image counts as done when its finished file has the
task's settings hash. One made with other settings is never replaced silently: the run refuses (WouldOverwrite,
before any model is loaded) unless job.overwrite=true.

index.jsonl lists exactly the finished images in the folder, one line each, built from their sidecars: rebuilt
at the start of every run (dropping a line cut off by a crash, lines of images no longer there and duplicates,
adding finished images it lacks), then one line appended per new image, or the line replaced (the whole file
rewritten atomically) when an image is replaced. The run holds the folder lock (outputs/lock.py) throughout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from pipeline.errors import PipelineError
from pipeline.outputs.atomic import append_line, atomic_write_bytes

INDEX_FILE = "index.jsonl"
INDEX_KEYS = ("file", "id", "row_index", "seed", "prompt", "steps", "height", "width", "settings_hash", "time_s")


def index_line(sidecar: dict[str, Any]) -> str:
    return json.dumps({k: sidecar.get(k) for k in INDEX_KEYS}, sort_keys=True)


def finished_images(folder: Path) -> dict[str, dict[str, Any]]:
    """{`<stem>.png`: its sidecar} for every finished image in `folder`."""
    found = {}
    for side in sorted(folder.glob("*.json")):
        png = side.with_suffix(".png")
        if not png.is_file():
            continue
        try:
            data = json.loads(side.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("file") == png.name:  # not run.json or another stray JSON file
            found[png.name] = data
    return found


# --- planned images against what is there ----------------------------------------------------------------------


@dataclass
class Partition:
    done: list = field(default_factory=list)  # finished with the same settings: skipped
    pending: list = field(default_factory=list)  # to make (replaced ones included, with overwrite)
    conflicts: list = field(default_factory=list)  # (task, sidecar): finished with other settings


def partition(tasks: Iterable, finished: dict[str, dict[str, Any]]) -> Partition:
    """Sort `tasks` (pipeline.tasks.ImageTask) by what is on disk. A conflict is pending too: the caller refuses
    unless job.overwrite=true. Images with the same settings are kept even then (remaking them would give the
    same bytes, and a resumed overwrite run must not start again from scratch)."""
    p = Partition()
    for t in tasks:
        side = finished.get(f"{t.stem}.png")
        if side is not None and side.get("settings_hash") == t.settings_hash:
            p.done.append(t)
            continue
        if side is not None:
            p.conflicts.append((t, side))
        p.pending.append(t)
    return p


class WouldOverwrite(PipelineError):
    """Finished images in the folder were made with other settings; the run would replace them."""

    def __init__(self, folder: Path, conflicts: list[tuple[Any, dict[str, Any]]], expected: dict[str, Any],
                 examples: int = 2):
        self.folder, self.conflicts = folder, conflicts
        n = len(conflicts)
        lines = [f"{n} finished image{'s' if n != 1 else ''} in {folder} {'were' if n != 1 else 'was'} made with "
                 "other settings and would be replaced:"]
        for task, side in conflicts[:examples]:
            new = {**task.params(), **expected, "settings_hash": task.settings_hash}
            lines.append(f"  {task.stem}.png: {describe_differences(side, new)}")
        if n > examples:
            lines.append(f"  ... and {n - examples} more")
        lines.append("Set job.overwrite=true to replace them, or set a new job.output_dir to keep them.")
        super().__init__("\n".join(lines))


def _quant_label(q: Any) -> Optional[str]:
    if not isinstance(q, dict):
        return None
    if not q.get("enabled"):
        return "16-bit"
    return f"{q.get('precision')} r{q.get('rank')}"


def _short(value: Any, limit: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, str):
        text = repr(value if len(value) <= limit else value[: limit - 3] + "...")
    return text


def describe_differences(side: dict[str, Any], new: dict[str, Any]) -> str:
    """`steps 4 -> 8, size 128x128 -> 256x256`: what the image on disk (its sidecar) was made with against what
    the run would make (the keys of a sidecar: task.params() with model, scheduler, quantization, dtype)."""
    out = []

    def differ(name: str, old: Any, now: Any, fmt=str) -> None:
        if old != now:
            out.append(f"{name} {fmt(old)} -> {fmt(now)}")

    differ("prompt", side.get("prompt"), new.get("prompt"), _short)
    differ("negative prompt", side.get("negative_prompt"), new.get("negative_prompt"), _short)
    differ("seed", side.get("seed"), new.get("seed"))
    differ("steps", side.get("steps"), new.get("steps"))
    differ("guidance", side.get("guidance"), new.get("guidance"))
    differ("true_cfg_scale", side.get("true_cfg_scale"), new.get("true_cfg_scale"))
    size = lambda d: f"{d.get('width')}x{d.get('height')}"  # noqa: E731
    differ("size", size(side), size(new))
    differ("max_sequence_length", side.get("max_sequence_length"), new.get("max_sequence_length"))
    differ("model", side.get("model"), new.get("model"))
    differ("scheduler", side.get("scheduler"), new.get("scheduler"))
    differ("quantization", _quant_label(side.get("quantization")), _quant_label(new.get("quantization")))
    inputs = lambda d: ", ".join(f"{i.get('role')} {Path(str(i.get('path'))).name} ({str(i.get('sha256'))[:12]})"  # noqa: E731
                                 for i in d.get("inputs") or []) or "none"
    differ("input images", inputs(side), inputs(new))
    if "dtype" in new:
        differ("dtype", side.get("dtype"), new.get("dtype"))
    return ", ".join(out) or ("other model or scheduler details (settings hash "
                              f"{side.get('settings_hash')} -> {new.get('settings_hash')})")


# --- index.jsonl ---------------------------------------------------------------------------------------------


class Index:
    """index.jsonl of one folder, true to the finished images on disk (see the module docstring)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / INDEX_FILE
        self.lines: dict[str, str] = {}  # file -> its line, in file order
        # Several processes write the folder (a data-parallel run): never rewrite the file, append even the line of
        # a replaced image; the duplicate goes when the run's rank 0 rebuilds the index at the end.
        self.append_only = False

    @classmethod
    def rebuild(cls, folder: Path, finished: dict[str, dict[str, Any]]) -> "Index":
        """The index of exactly `finished`, keeping the order of the lines already there; rewritten (atomically)
        only if that changes the file."""
        index = cls(folder)
        order: list[str] = []
        old = b""
        if index.path.exists():
            old = index.path.read_bytes()
            for raw in old.decode("utf-8", "replace").splitlines():
                try:
                    name = json.loads(raw)["file"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut off by a crash: its image, if finished, gets its line back below
                if name in finished and name not in order:
                    order.append(name)
        order += [name for name in finished if name not in order]
        index.lines = {name: index_line(finished[name]) for name in order}
        if index._text() != old:
            index._write()
        return index

    def add(self, sidecar: dict[str, Any]) -> bool:
        """The line of an image just written: appended, or replacing the line of the image it replaced (then
        True)."""
        name, line = sidecar["file"], index_line(sidecar)
        replaced = name in self.lines
        self.lines[name] = line
        if replaced and not self.append_only:
            self._write()
        else:
            append_line(self.path, line)
        return replaced

    def _text(self) -> bytes:
        return "".join(f"{line}\n" for line in self.lines.values()).encode()

    def _write(self) -> None:
        atomic_write_bytes(self.path, self._text())
