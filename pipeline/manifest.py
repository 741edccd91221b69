"""Read and validate prompt manifests (JSONL, CSV/TSV, TXT, YAML) into typed rows.

Why a whole-file pass: a bad row is found before the first image, reported as
`file:line: field: problem`, and `job.on_error` decides whether to stop or to skip it.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.config.schema import check_generation_values

PROJECT_ROOT = Path(__file__).resolve().parents[1]

INT_FIELDS = ("seed", "steps", "height", "width", "num_images")
FLOAT_FIELDS = ("guidance", "true_cfg_scale")
STR_FIELDS = ("id", "negative_prompt")
KNOWN_FIELDS = ("prompt", *STR_FIELDS, *INT_FIELDS, *FLOAT_FIELDS, "tags")
MAX_IMAGES_PER_ROW = 64
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "txt",
    ".yaml": "yaml",
    ".yml": "yaml",
}


def resolve_manifest_path(manifest: str) -> Path:
    """Relative paths are tried against the working directory, then the project root."""
    p = Path(manifest).expanduser()
    if p.is_absolute() or p.exists():
        return p
    fallback = PROJECT_ROOT / p
    return fallback if fallback.exists() else p


@dataclass(frozen=True)
class PromptRow:
    """One manifest row. `index` is its position among all rows (bad ones too), so seeds are stable."""

    index: int
    line: int
    prompt: str
    id: str
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    true_cfg_scale: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    num_images: int = 1
    tags: dict[str, Any] = field(default_factory=dict)
    explicit_id: bool = False


@dataclass(frozen=True)
class RowProblem:
    path: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.message}"


@dataclass
class Manifest:
    path: Path
    format: str
    sha256: str
    rows: list[PromptRow]
    problems: list[RowProblem]
    total_rows: int

    @property
    def skipped_lines(self) -> set[int]:
        return {p.line for p in self.problems}


def read_manifest(path: str | Path, limit: Optional[int] = None) -> Manifest:
    """Parse and check a whole manifest. Raises ManifestError only when the file itself is unusable."""
    from pipeline.errors import ManifestError

    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, [f"{path}: file not found"], hint="Set job.manifest to an existing file.")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        allowed = ", ".join(sorted(FORMATS))
        raise ManifestError(path, [f"{path}: unknown manifest format {path.suffix!r}"], hint=f"Use one of: {allowed}.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(path, [f"{path}: not UTF-8 text ({e})"], hint="Save the manifest as UTF-8.") from None
    raw_rows, problems = _PARSERS[fmt](text, str(path))
    rows: list[PromptRow] = []
    seen_ids: dict[str, int] = {}
    index = 0
    for line, raw in raw_rows:
        if limit is not None and index >= limit:
            break
        row, row_problems = _build_row(raw, index, line, str(path))
        index += 1
        if row is not None and not row_problems:
            first = seen_ids.get(row.id)
            if first is not None:
                what = "duplicate id" if row.explicit_id else "automatic id collides with the id"
                row_problems.append(RowProblem(str(path), line, "id", f"{what} {row.id!r} (first used on line {first})"))
            else:
                seen_ids[row.id] = line
        if row_problems:
            problems.extend(row_problems)
        else:
            rows.append(row)
    problems.sort(key=lambda p: p.line)
    return Manifest(path, fmt, hashlib.sha256(data).hexdigest(), rows, problems, index)


RawRows = list[tuple[int, Any]]


def _parse_jsonl(text: str, path: str) -> tuple[RawRows, list[RowProblem]]:
    rows, problems = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(RowProblem(path, n, "json", f"invalid JSON at column {e.colno}: {e.msg}"))
    return rows, problems


def _parse_txt(text: str, path: str) -> tuple[RawRows, list[RowProblem]]:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            rows.append((n, {"prompt": stripped}))
    return rows, []


def _parse_delimited(text: str, path: str, delimiter: str) -> tuple[RawRows, list[RowProblem]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return [], []
    columns = [h.strip() for h in header]
    names = [c.lower() if c.lower() in KNOWN_FIELDS else c for c in columns]
    problems = []
    if "prompt" not in names:
        problems.append(RowProblem(path, 1, "header", f"no 'prompt' (or 'Prompt') column; columns are {columns}"))
        return [], problems
    for c in names:
        close = difflib.get_close_matches(c.lower(), KNOWN_FIELDS, n=1, cutoff=0.8)
        if c not in KNOWN_FIELDS and close:
            problems.append(
                RowProblem(path, 1, c, f"unknown column; did you mean {close[0]!r}? (other columns become tags)")
            )
    if problems:
        return [], problems
    rows = []
    line = reader.line_num + 1
    for record in reader:
        if any(cell.strip() for cell in record):
            if len(record) != len(names):
                problems.append(
                    RowProblem(path, line, "row", f"has {len(record)} cells, header has {len(names)}")
                )
            else:
                raw: dict[str, Any] = {}
                tags: dict[str, Any] = {}
                for name, cell in zip(names, record):
                    if cell.strip() == "":
                        continue
                    if name in KNOWN_FIELDS:
                        raw[name] = _from_text(name, cell.strip())
                    else:
                        tags[name] = cell.strip()
                if tags:
                    raw["tags"] = tags
                rows.append((line, raw))
        line = reader.line_num + 1
    return rows, problems


class _Text(str):
    """A value that came from a text cell: numbers in it may be parsed."""


def _from_text(name: str, cell: str) -> Any:
    return _Text(cell) if name in INT_FIELDS + FLOAT_FIELDS else cell


def _parse_yaml(text: str, path: str) -> tuple[RawRows, list[RowProblem]]:
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        return [], [RowProblem(path, line, "yaml", f"invalid YAML: {getattr(e, 'problem', e)}")]
    if node is None:
        return [], []
    if not isinstance(node, yaml.SequenceNode):
        return [], [RowProblem(path, node.start_mark.line + 1, "yaml", "expected a list of prompts or mappings")]
    rows = []
    for item in node.value:
        rows.append((item.start_mark.line + 1, loader.construct_object(item, deep=True)))
    return rows, []


_PARSERS = {
    "jsonl": _parse_jsonl,
    "txt": _parse_txt,
    "csv": lambda t, p: _parse_delimited(t, p, ","),
    "tsv": lambda t, p: _parse_delimited(t, p, "\t"),
    "yaml": _parse_yaml,
}


def _build_row(raw: Any, index: int, line: int, path: str) -> tuple[Optional[PromptRow], list[RowProblem]]:
    def problem(fld: str, msg: str) -> RowProblem:
        return RowProblem(path, line, fld, msg)

    if isinstance(raw, str):
        raw = {"prompt": raw}
    if not isinstance(raw, dict):
        return None, [problem("row", f"expected an object with a 'prompt', got {type(raw).__name__}")]
    problems: list[RowProblem] = []
    values: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key not in KNOWN_FIELDS:
            close = difflib.get_close_matches(key, KNOWN_FIELDS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(
                problem(key, f"unknown field{hint} (allowed: {', '.join(KNOWN_FIELDS)}; put free-form data in 'tags')")
            )
            continue
        if value is None:
            continue
        try:
            values[key] = _coerce(key, value)
        except ValueError as e:
            problems.append(problem(key, str(e)))
    prompt = values.get("prompt")
    if "prompt" not in raw or prompt is None:
        problems.append(problem("prompt", "missing (every row needs a non-empty prompt)"))
    elif not prompt.strip():
        problems.append(problem("prompt", "is empty"))
    if "id" in values and not ID_PATTERN.match(values["id"]):
        problems.append(
            problem("id", f"{values['id']!r} is not usable in a file name; use letters, digits, '.', '_' and '-'")
        )
    n = values.get("num_images")
    if n is not None and not 1 <= n <= MAX_IMAGES_PER_ROW:
        problems.append(problem("num_images", f"must be in 1..{MAX_IMAGES_PER_ROW}, got {n}"))
    for key, msg in check_generation_values("", **values):
        problems.append(problem(key, msg))
    if problems:
        return None, problems
    explicit = "id" in values
    values.setdefault("id", f"{index:05d}")
    values.setdefault("num_images", 1)
    values["tags"] = _as_tags(values.get("tags"))
    return PromptRow(index=index, line=line, explicit_id=explicit, **values), []


def _coerce(key: str, value: Any) -> Any:
    if key in INT_FIELDS:
        return _number(value, int, "an integer")
    if key in FLOAT_FIELDS:
        return _number(value, float, "a number")
    if key == "tags":
        if not isinstance(value, (dict, list, str)):
            raise ValueError(f"expected a mapping, list or string, got {_describe(value)}")
        return value
    if key == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_describe(value)}")
    return str(value)


def _number(value: Any, cast: type, name: str) -> Any:
    """Text cells may hold numbers as text; JSON/YAML values must already be numbers (not bools)."""
    if isinstance(value, _Text):
        try:
            return cast(value)
        except ValueError:
            raise ValueError(f"expected {name}, got {str(value)!r}") from None
    exact = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not exact or (cast is int and isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected {name}, got {_describe(value)}")
    return cast(value)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _as_tags(tags: Any) -> dict[str, Any]:
    if tags is None:
        return {}
    if isinstance(tags, dict):
        return {str(k): v for k, v in tags.items()}
    if isinstance(tags, str):
        return {"tags": [tags]}
    return {"tags": list(tags)}

