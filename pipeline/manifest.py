"""Read and validate prompt manifests into typed rows: the evaluation sets as published, and your own lists.

Why a whole-file pass: every bad row is found before the first image (even past `job.limit`),
reported as `file:line: field: problem`, and `job.on_error` decides whether to stop or to skip it.

Formats (by extension; one-line examples; parsers in `pipeline.manifest_formats`):

    .jsonl/.ndjson  {"id": "cat", "prompt": "a cat on a red chair", "seed": 42, "tags": {"set": "pets"}}
                    {"tag": "single_object", "include": [...], "prompt": "a photo of a bench"}  (GenEval)
    .json           ["a cat on a red chair", "a dog"]                               (HPSv2 benchmark files)
                    [{"prompt": "a cat on a red chair", "seed": 3}, ...]            (a list of row objects)
                    {"0b3a9c": {"category": "people", "prompt": "a portrait"}, ...} (MJHQ-30K meta_data.json: id = key)
                    {"images": [...], "annotations": [{"image_id": 1, "id": 38, "caption": "a cat"}]}  (COCO)
                    {"prompts": ["a cat", ...]}                                     (an object holding one list)
    .csv            Prompts,Category  /  A red colored car.,Colors                  (DrawBench; cells may be quoted)
    .tsv            Prompt<TAB>Category<TAB>Challenge<TAB>Note                      (PartiPrompts; cells are literal)
    .txt            a cat on a red chair                                            (T2I-CompBench; # comments)
    .yaml/.yml      - a cat on a red chair   /   - {prompt: a dog, seed: 3}         (a list, or the JSON layouts)

Fields, in every format, matched ignoring case, '_', '-' and spaces (`Negative Prompt` is negative_prompt):
  prompt: the first of prompt, prompts, prompt_text, caption, captions, text, sentence (or `job.columns.prompt`)
  id:     id, prompt_id, uid (or `job.columns.id`; in an object keyed by id, the key). Must match ID_PATTERN;
          an integer id becomes a string. No id: the row index, 00000, 00001, ...
  negative_prompt: negative_prompt, negative, neg_prompt (or `job.columns.negative_prompt`)
  settings: seed (-1: random), steps (num_inference_steps), guidance (guidance_scale), true_cfg_scale,
          height, width, num_images (num_images_per_prompt), tags.
  image:  image, images, input_image, image_path, init_image, source_image (or `job.columns.image`): the input
          image(s) of an edit model, paths relative to the manifest's folder; several: a JSON/YAML list, or in a
          CSV/TSV cell separated by '|' (a.png|b.png)
  mask:   mask, mask_image, mask_path (or `job.columns.mask`): an inpainting model's mask
  loras:  loras, lora: the row's own LoRAs, added to the run's (`[{"path": "a.safetensors", "strength": 0.8}]`,
          in a CSV/TSV cell `a.safetensors:0.8|b.safetensors`; pipeline/lora/spec.py)
Input images are checked against the model's input kind (`inputs`, see pipeline/inputs.py); COCO's `images`
list is the document's layout, not a row field, and its `image_id` stays a tag.
Every other column/field is kept as a tag, nested values (GenEval's `include`) as they are; the other
prompt/id candidates too (COCO: the caption's annotation `id` is the row id, since an image has ~5 captions
and its `image_id` repeats; `image_id` is kept as a tag). A name one letter off a setting (two for the long
ones, `stpes`, `negativ_prompt`) whose values fit that setting is reported as a typo rather than silently
kept as a tag.

Lines: JSON/YAML rows report the line on which their element starts; when several elements start on one
line (minified JSON) the message also names the element ("item 3", "key 'abc'").
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.config.schema import check_generation_values
from pipeline.inputs import LIST_SEPARATOR, InputChecker, InputImage
from pipeline.lora.spec import LoraRef, parse_row_loras
from pipeline.manifest_formats import FORMATS, PARSERS, Parsed, Record, Text

PROJECT_ROOT = Path(__file__).resolve().parents[1]

INT_FIELDS = ("seed", "steps", "height", "width", "num_images")
FLOAT_FIELDS = ("guidance", "true_cfg_scale")
STR_FIELDS = ("id", "negative_prompt")
KNOWN_FIELDS = ("prompt", *STR_FIELDS, *INT_FIELDS, *FLOAT_FIELDS, "tags", "image", "mask", "loras")
MAX_IMAGES_PER_ROW = 64
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

# The names each field is recognised by, in priority order (the first one present wins; the others become tags).
# Not `name`, `key` or `image_id` for the id: they repeat or hold free text in the files people have.
FIELD_NAMES: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "prompts", "prompt_text", "caption", "captions", "text", "sentence"),
    "id": ("id", "prompt_id", "uid"),
    "negative_prompt": ("negative_prompt", "negative", "neg_prompt"),
    "seed": ("seed",),
    "steps": ("steps", "num_inference_steps"),
    "guidance": ("guidance", "guidance_scale"),
    "true_cfg_scale": ("true_cfg_scale",),
    "height": ("height",),
    "width": ("width",),
    "num_images": ("num_images", "num_images_per_prompt"),
    "tags": ("tags",),
    "image": ("image", "images", "input_image", "image_path", "init_image", "source_image"),
    "mask": ("mask", "mask_image", "mask_path"),
    "loras": ("loras", "lora"),
}
MAPPABLE = ("prompt", "id", "negative_prompt", "image", "mask")  # fields `job.columns` can name
TYPO_TARGETS = (*INT_FIELDS, *FLOAT_FIELDS, "negative_prompt")


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
    seed: Optional[int] = None  # -1: a random seed, drawn by the runner
    steps: Optional[int] = None
    guidance: Optional[float] = None
    true_cfg_scale: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    num_images: int = 1
    tags: dict[str, Any] = field(default_factory=dict)
    explicit_id: bool = False
    images: tuple[InputImage, ...] = ()  # an edit model's input image(s), checked (pipeline/inputs.py)
    mask: Optional[InputImage] = None  # an inpainting model's mask
    loras: tuple[LoraRef, ...] = ()  # the row's own LoRAs (pipeline/lora/spec.py), added to the run's


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
    """`rows`: the valid rows with index < limit. `problems`, `total_rows` and `bad_rows` cover the whole file."""

    path: Path
    format: str
    sha256: str
    rows: list[PromptRow]
    problems: list[RowProblem]
    total_rows: int  # data rows in the file, bad ones included
    bad_rows: int = 0  # distinct rows that cannot be used (a header problem makes every row bad)

    @property
    def skipped_lines(self) -> set[int]:
        return {p.line for p in self.problems}


def read_manifest(path: str | Path, limit: Optional[int] = None, columns: Any = None,
                  inputs: str = "text") -> Manifest:
    """Parse and check a whole manifest. Raises ManifestError only when the file itself is unusable.

    `columns`: which column/field holds the prompt, id, negative prompt, image and mask, as a mapping or an
    object with those attributes (`job.columns`); a None entry is detected. Naming a column the file lacks raises.
    `inputs`: the model's input kind (pipeline.families.inputs_of): "text" (rows must not carry an image),
    "image", "images" (1..3) or "image+mask". Every input file is checked once, however many rows share it.
    """
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
    src = str(path)
    parsed = PARSERS[fmt](text)
    problems = [RowProblem(src, line, fld, msg) for line, fld, msg in parsed.problems]
    plan = _plan(parsed, _mapping(columns), path, fmt)
    checker = InputChecker(inputs, path.absolute().parent, fmt, tabular=plan.tabular)
    problems += [RowProblem(src, line, fld, msg) for line, fld, msg in plan.problems]
    shared = {line for line, n in Counter(r.line for r in parsed.records).items() if n > 1}

    rows: list[PromptRow] = []
    bad: set[int] = set()
    seen_ids: dict[str, int] = {}
    for index, rec in enumerate(parsed.records):
        suffix = f" ({rec.where})" if rec.line in shared else ""
        if rec.error:
            row, row_problems = None, [RowProblem(src, rec.line, rec.error[0], rec.error[1] + suffix)]
        elif plan.rows_unusable and not isinstance(rec.value, str):
            bad.add(index)  # the header/file problem above says why
            continue
        else:
            row, row_problems = _build_row(rec, plan, index, src, suffix, checker)
        if row is not None and not row_problems:
            first = seen_ids.get(row.id)
            if first is not None:
                what = "duplicate id" if row.explicit_id else "automatic id collides with the id"
                msg = f"{what} {row.id!r} (first used on line {first}){suffix}"
                row_problems.append(RowProblem(src, rec.line, "id", msg))
            else:
                seen_ids[row.id] = rec.line
        if row_problems:
            problems.extend(row_problems)
            bad.add(index)
        elif limit is None or index < limit:
            rows.append(row)
    problems.sort(key=lambda p: p.line)
    return Manifest(path, fmt, hashlib.sha256(data).hexdigest(), rows, problems, len(parsed.records), len(bad))


# --- which name holds which field ---------------------------------------------------------------------------


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.lower())


def _mapping(columns: Any) -> dict[str, Optional[str]]:
    if columns is None:
        return {}
    if isinstance(columns, Mapping):
        got = {str(k): v for k, v in columns.items()}
    else:
        got = {k: getattr(columns, k, None) for k in MAPPABLE}
    unknown = set(got) - set(MAPPABLE)
    if unknown:
        raise ValueError(f"columns can name {', '.join(MAPPABLE)}; got {sorted(unknown)}")
    return {k: str(v) for k, v in got.items() if v not in (None, "")}


@dataclass
class _Plan:
    fields: dict[str, str]  # the file's name -> field
    typos: dict[str, str]  # the file's name -> the setting it looks like a misspelling of
    prompt_name: Optional[str]
    id_from_key: bool  # rows keyed by id: the key is the id
    tabular: bool
    rows_unusable: bool = False  # a header/file problem makes every row (except bare prompts) unusable
    problems: list[tuple[int, str, str]] = field(default_factory=list)


def _plan(parsed: Parsed, columns: dict[str, str], path: Path, fmt: str) -> _Plan:
    """Decide once per file which of its names holds which field, so every row reads the same way."""
    tabular = parsed.header is not None
    if tabular:
        names = list(parsed.header)
    else:
        shapes = dict.fromkeys(tuple(r.value) for r in parsed.records if isinstance(r.value, dict))
        names = list(dict.fromkeys(str(k) for shape in shapes for k in shape))
    fields: dict[str, str] = {}
    missing = []
    for fld, asked in columns.items():
        found = _find(names, [asked], taken=fields)
        if found is None:
            missing.append((fld, asked))
        else:
            fields[found] = fld
    if missing:
        _raise_missing(path, fmt, missing, names)
    id_from_key = parsed.keyed and "id" not in columns
    for fld, aliases in FIELD_NAMES.items():
        if fld in fields.values() or (fld == "id" and id_from_key):
            continue
        found = _find(names, aliases, taken=fields)
        if found is not None:
            fields[found] = fld
    typos = {}
    for name in names:
        if name not in fields:
            close = _looks_like(name)
            if close:
                typos[name] = close
    prompt_name = next((n for n, f in fields.items() if f == "prompt"), None)
    plan = _Plan(fields, typos, prompt_name, id_from_key, tabular)
    if tabular:
        _check_header(plan, parsed, names)
    elif prompt_name is None and any(isinstance(r.value, dict) for r in parsed.records):
        first = next(r.line for r in parsed.records if isinstance(r.value, dict))
        plan.problems.append((first, "prompt", f"no field holds the prompt in any row; fields are {names}. "
                                               f"{_prompt_fix()}"))
        plan.rows_unusable = True
    return plan


def _find(names: list[str], wanted: tuple[str, ...] | list[str], taken: dict[str, str]) -> Optional[str]:
    """The first of `wanted` the file has: spelt exactly, else ignoring case, '_', '-' and spaces."""
    free = [n for n in names if n not in taken]
    for want in wanted:
        if want in free:
            return want
        match = [n for n in free if _norm(n) == _norm(want)]
        if match:
            return match[0]
    return None


def _raise_missing(path: Path, fmt: str, missing: list[tuple[str, str]], names: list[str]) -> None:
    from pipeline.errors import ManifestError

    if names:
        have = f"{'columns' if fmt in ('csv', 'tsv') else 'fields'} are {names}"
    else:
        have = f"this {fmt.upper()} file has no named columns or fields (each row is a bare prompt)"
    lines = [f"{path}: job.columns.{fld}={asked}: no such column; {have}" for fld, asked in missing]
    hint = ("Set job.columns.<field> to one of the file's columns (case does not matter), or to null to detect it."
            if names else "Set job.columns.<field>=null for this file.")
    raise ManifestError(path, lines, hint=hint)


def _check_header(plan: _Plan, parsed: Parsed, names: list[str]) -> None:
    if plan.prompt_name is None:
        plan.problems.append((1, "header", f"no prompt column; columns are {names}. {_prompt_fix()}"))
        plan.rows_unusable = True
    for name, close in plan.typos.items():
        cells = [r.value[name] for r in parsed.records if isinstance(r.value, dict) and name in r.value]
        if cells and all(_fits(close, c) for c in cells):
            plan.problems.append((1, name, f"column looks like a typo of {close!r}: rename it {close!r} "
                                           "(a column whose name is not this close to a setting is kept as a tag)"))
            plan.rows_unusable = True


def _prompt_fix() -> str:
    return (f"Name the prompt column one of {', '.join(FIELD_NAMES['prompt'])} (any case), "
            "or set job.columns.prompt=<column>.")


def _looks_like(name: str) -> Optional[str]:
    """The setting `name` is a near miss of: one edit away (two for names longer than 6 letters)."""
    n = _norm(name)
    best = None
    for target in TYPO_TARGETS:
        t = _norm(target)
        d = _distance(n, t)
        if 0 < d <= (1 if len(t) <= 6 else 2) and (best is None or d < best[0]):
            best = (d, target)
    return best[1] if best else None


def _distance(a: str, b: str) -> int:
    """Edits (insert, delete, replace, swap two neighbours) turning a into b."""
    if abs(len(a) - len(b)) > 2:
        return 3
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def _fits(fld: str, value: Any) -> bool:
    """Whether `value` would be a valid value of `fld` (a near-miss name holding such values is a typo)."""
    try:
        _coerce(fld, value)
        return True
    except ValueError:
        return False


# --- one row ------------------------------------------------------------------------------------------------


def _build_row(rec: Record, plan: _Plan, index: int, path: str, suffix: str, checker: InputChecker
               ) -> tuple[Optional[PromptRow], list[RowProblem]]:
    def problem(fld: str, msg: str) -> RowProblem:
        return RowProblem(path, rec.line, fld, msg + suffix)

    raw = rec.value
    if isinstance(raw, str):
        raw = {"prompt": raw}
        fields: dict[str, str] = {"prompt": "prompt"}
    elif isinstance(raw, dict):
        fields = plan.fields
    else:
        return None, [problem("row", f"expected an object with a 'prompt', got {type(raw).__name__}")]
    problems: list[RowProblem] = []
    given: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if rec.key is not None:
        if plan.id_from_key:
            given["id"] = rec.key
        else:
            extra["key"] = rec.key
    for key, value in raw.items():
        key = str(key)
        fld = fields.get(key)
        if fld is not None:
            given[fld] = value
        elif key in plan.typos and not plan.tabular and _fits(plan.typos[key], value):
            close = plan.typos[key]
            problems.append(problem(key, f"looks like a typo of {close!r}: rename it {close!r} "
                                         "(a field whose name is not this close to a setting is kept as a tag)"))
        else:
            extra[key] = str(value) if isinstance(value, Text) else value
    values: dict[str, Any] = {}
    unreadable = set()
    for fld, value in given.items():
        if value is None:
            continue
        try:
            values[fld] = _coerce(fld, value)
        except ValueError as e:
            problems.append(problem(_name_of(fld, fields), str(e)))
            unreadable.add(fld)
    images, mask = values.pop("image", ()), values.pop("mask", None)
    if "loras" in values:  # paths relative to the manifest's folder, each file hashed once
        try:
            values["loras"] = parse_row_loras(values["loras"], checker.dir)
        except ValueError as e:
            problems.append(problem(_name_of("loras", fields), str(e)))
            del values["loras"]
    prompt = values.get("prompt")
    if prompt is None:
        hint = f"; this file's prompts are in {plan.prompt_name!r}" if plan.prompt_name not in (None, "prompt") else ""
        problems.append(problem("prompt", f"missing (every row needs a non-empty prompt{hint})"))
    elif not prompt.strip():
        problems.append(problem("prompt", "is empty"))
    if "id" in values and not ID_PATTERN.match(values["id"]):
        problems.append(problem(_name_of("id", fields), f"{values['id']!r} is not usable in a file name; "
                                                        "use letters, digits, '.', '_' and '-'"))
    n = values.get("num_images")
    if n is not None and not 1 <= n <= MAX_IMAGES_PER_ROW:
        problems.append(problem("num_images", f"must be in 1..{MAX_IMAGES_PER_ROW}, got {n}"))
    for key, msg in check_generation_values("", **values):
        problems.append(problem(_name_of(key, fields), msg))
    if not unreadable & {"image", "mask"}:  # checked against the model's input kind; each file once
        values["images"], values["mask"], found = checker.row(images, mask, bare=isinstance(rec.value, str))
        problems += [problem(_name_of(fld, fields), msg) for fld, msg in found]
    if problems:
        return None, problems
    explicit = "id" in values
    values.setdefault("id", f"{index:05d}")
    values.setdefault("num_images", 1)
    values["tags"] = {**extra, **_as_tags(values.get("tags"))}
    return PromptRow(index=index, line=rec.line, explicit_id=explicit, **values), []


def _name_of(fld: str, fields: dict[str, str]) -> str:
    """The file's own name for a field, so a message points at what the user sees (`Prompts`, `guidance_scale`)."""
    return next((name for name, f in fields.items() if f == fld), fld)


def _coerce(key: str, value: Any) -> Any:
    if key in INT_FIELDS:
        return _number(value, int, "an integer")
    if key in FLOAT_FIELDS:
        return _number(value, float, "a number")
    if key == "tags":
        if not isinstance(value, (dict, list, str)):
            raise ValueError(f"expected a mapping, list or string, got {_describe(value)}")
        return str(value) if isinstance(value, Text) else value
    if key == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if key == "image":
        return _paths(value)
    if key == "loras":
        return str(value) if isinstance(value, Text) else value
    if key == "mask" and not isinstance(value, str):
        raise ValueError(f"expected a path (a string), got {_describe(value)}")
    if key == "mask" and not value.strip():
        raise ValueError("is empty")
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_describe(value)}")
    return str(value)


def _paths(value: Any) -> tuple[str, ...]:
    """An `image` value: a path, or several (a JSON/YAML list; in a CSV/TSV cell, separated by '|')."""
    if isinstance(value, Text):
        parts = [p.strip() for p in value.split(LIST_SEPARATOR)]
    elif isinstance(value, str):
        parts = [value]
    elif isinstance(value, list):
        parts = value
        for p in parts:
            if not isinstance(p, str):
                raise ValueError(f"expected a path or a list of paths, got {_describe(p)} in the list")
    else:
        raise ValueError(f"expected a path or a list of paths, got {_describe(value)}")
    if any(not p.strip() for p in parts):
        if isinstance(value, list):
            raise ValueError(f"has an empty path in {value!r}")
        raise ValueError("is empty" if not value.strip() else f"has an empty path: {str(value)!r}")
    return tuple(str(p) for p in parts)


def _number(value: Any, cast: type, name: str) -> Any:
    """Text cells may hold numbers as text; JSON/YAML values must already be numbers (not bools)."""
    if isinstance(value, Text):
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
