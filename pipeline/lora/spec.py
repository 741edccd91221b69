"""Which LoRAs an image is made with: the run's (`model.loras`) plus its row's (`loras` in a manifest row).

Why here, apart from reading and applying: the manifest reader, the tasks (settings hash, batch key, metadata)
and the runner need a LoRA's identity (file, sha256, strength) long before any tensor is read. A row's LoRAs add
to the run's; the same file in both takes the row's strength. A set is kept in a canonical order (sha256, then
strength), so the order LoRAs are written in never changes an image, its hash or its batch.

Row syntax: JSON/YAML `"loras": [{"path": "style.safetensors", "strength": 0.8}, "other.safetensors"]` (a bare
path: strength 1); CSV/TSV/one string: `style.safetensors:0.8|other.safetensors`. Paths are relative to the
manifest's folder (the run's `model.loras` to the working directory); absolute and `~` paths work.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional

SEPARATOR = "|"


@dataclass(frozen=True)
class LoraRef:
    """One LoRA file at one strength, identified by its content."""

    name: str  # the file's stem: <lora:name:strength>
    path: str  # resolved
    given: str  # as written
    sha256: str
    strength: float = 1.0

    def key(self) -> tuple[str, float]:
        return self.sha256, self.strength

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.given, "sha256": self.sha256, "strength": self.strength}


@lru_cache(maxsize=256)
def file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's sha256, cached by (path, size, mtime): a LoRA named by many rows is read once."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def lora_ref(given: str, base: Path, strength: float = 1.0) -> LoraRef:
    """Resolve `given` against `base`, check it is a file, hash it (cached by size and mtime); ValueError if not."""
    if not isinstance(given, str) or not given.strip():
        raise ValueError(f"expected a LoRA file path, got {given!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"strength must be a number, got {strength!r}")
    path = Path(os.path.expanduser(given.strip()))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ValueError(f"no such LoRA file: {path}" + (" (a folder)" if path.is_dir() else ""))
    st = path.stat()
    return LoraRef(path.stem, str(path.resolve()), given.strip(), file_sha256(str(path.resolve()), st.st_size,
                                                                           st.st_mtime_ns), float(strength))


def _entry(item: Any, base: Path) -> LoraRef:
    if isinstance(item, str):
        given, _, strength = item.strip().rpartition(":") if _has_strength(item) else (item, "", "")
        return lora_ref(given, base, float(strength) if strength else 1.0)
    if isinstance(item, dict):
        unknown = set(item) - {"path", "strength"}
        if unknown or "path" not in item:
            raise ValueError(f"a LoRA is {{path, strength}}, got keys {sorted(item)}")
        return lora_ref(item["path"], base, item.get("strength", 1.0))
    raise ValueError(f"expected a LoRA path or {{path, strength}}, got {type(item).__name__}")


def _has_strength(text: str) -> bool:
    """`style.safetensors:0.8` (not a Windows drive `C:\\...`): the part after the last ':' is a number."""
    head, sep, tail = text.strip().rpartition(":")
    if not sep or not head:
        return False
    try:
        float(tail)
    except ValueError:
        return False
    return True


def parse_row_loras(value: Any, base: Path) -> tuple[LoraRef, ...]:
    """A manifest row's `loras` value (see the module docstring); ValueError says what is wrong."""
    if isinstance(value, str):
        items: Iterable[Any] = [p for p in value.split(SEPARATOR) if p.strip()]
    elif isinstance(value, dict):
        items = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise ValueError(f"expected a list of LoRAs, got {type(value).__name__}")
    return tuple(_entry(item, base) for item in items)


def run_loras(specs: Iterable[Any], base: Optional[Path] = None) -> tuple[LoraRef, ...]:
    """`model.loras` ([{path, strength}]) as references, paths relative to the working directory."""
    base = base or Path.cwd()
    return tuple(lora_ref(str(s.path), base, float(s.strength)) for s in specs)


def lora_set(run: Iterable[LoraRef], row: Iterable[LoraRef] = ()) -> tuple[LoraRef, ...]:
    """The LoRAs an image is made with: the run's and its row's (the row's strength wins for the same file), in
    the canonical order; strength-0 entries dropped (they change nothing)."""
    merged = {r.sha256: r for r in run}
    merged.update({r.sha256: r for r in row})
    return tuple(sorted((r for r in merged.values() if r.strength != 0), key=LoraRef.key))


def prompt_tags(loras: Iterable[dict[str, Any]]) -> str:
    """` <lora:name:0.8>` tags as AUTOMATIC1111 writes them into a prompt (empty without LoRAs)."""
    return "".join(f" <lora:{d['name']}:{d['strength']:g}>" for d in loras)
