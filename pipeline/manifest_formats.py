"""File formats of prompt manifests: each parser turns a file's text into records, one per data row.

A parser knows the syntax of its format and nothing of the fields: which column or key holds the
prompt, the id or a setting is decided afterwards, the same way for every format
(`pipeline.manifest`). Every physical data row becomes a record, parseable or not, so a row's
index (and so its automatic id and seed) does not depend on whether an earlier row is broken.

Lines: JSONL/TXT/CSV/TSV rows carry the line they start on. For JSON and YAML documents a row's
line is the line on which its element starts (JSON: found by walking the document with
`json.JSONDecoder.raw_decode`; YAML: the parser's marks); `Record.where` ("item 3", "key 'abc'")
is added to messages when several elements start on the same line (minified JSON).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "txt",
    ".yaml": "yaml",
    ".yml": "yaml",
}


class Text(str):
    """A value that came from a text cell (CSV/TSV): numbers in it may be parsed."""


@dataclass(slots=True)
class Record:
    """One data row as the file has it: `value` is a mapping of the row's own names, or a bare prompt string."""

    line: int
    value: Any = None
    error: Optional[tuple[str, str]] = None  # (field, message): the row could not be parsed at all
    key: Optional[str] = None  # the row's key in an object keyed by id (MJHQ's meta_data.json)
    item: Optional[int] = None  # 1-based element number in a JSON/YAML document

    @property
    def where(self) -> str:
        """Names the element, for messages when its line is shared with another (minified JSON)."""
        if self.key is not None:
            return f"key {self.key!r}"
        return f"item {self.item}" if self.item is not None else ""


@dataclass
class Parsed:
    records: list[Record]
    problems: list[tuple[int, str, str]] = field(default_factory=list)  # whole-file (line, field, message)
    header: Optional[list[str]] = None  # CSV/TSV: the column names, in order
    keyed: bool = False  # rows are the values of an object keyed by id


def parse_jsonl(text: str) -> Parsed:
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(Record(n, json.loads(line)))
        except json.JSONDecodeError as e:
            records.append(Record(n, error=("json", f"invalid JSON at column {e.colno}: {e.msg}")))
    return Parsed(records)


def parse_txt(text: str) -> Parsed:
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            records.append(Record(n, stripped))
    return Parsed(records)


def parse_delimited(text: str, delimiter: str, quoting: int) -> Parsed:
    """CSV quotes cells ("a, b" and ""); TSV does not (a cell is everything between tabs, as in PartiPrompts.tsv,
    whose prompt '"G I G G L E" painted ...' starts with a quote)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader)
    except StopIteration:
        return Parsed([], header=[])
    except csv.Error as e:
        return Parsed([], [(reader.line_num or 1, "header", f"unreadable header: {e}")], header=[])
    # An unnamed column (a spreadsheet's index) still needs a name to be kept as a tag.
    names = [h.strip() or f"column{i}" for i, h in enumerate(header, start=1)]
    records = []
    line = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # e.g. a cell over csv.field_size_limit(): a quote left open in a big file
            records.append(Record(line, error=("row", f"unreadable: {e}")))
            break
        if any(cell.strip() for cell in cells):
            if len(cells) != len(names):
                records.append(Record(line, error=("row", f"has {len(cells)} cells, header has {len(names)}")))
            else:
                records.append(Record(line, {n: Text(c.strip()) for n, c in zip(names, cells) if c.strip()}))
        line = reader.line_num + 1
    return Parsed(records, header=names)


def parse_json(text: str) -> Parsed:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        return Parsed([], [(e.lineno, "json", f"invalid JSON at column {e.colno}: {e.msg}")])
    path, keyed = choose_layout(doc)
    if path is None:
        return Parsed([], [(1, "json", layout_error(doc))])
    pos = _ws(text, 0)
    if not keyed and "\n" not in text[pos:].rstrip():
        # Minified (COCO's captions files are): every element starts on one line; no need to find where.
        rows = doc
        for key in path:
            rows = rows[key]
        line = text.count("\n", 0, pos) + 1
        return Parsed([Record(line, value, item=i) for i, value in enumerate(rows, start=1)])
    for key in path:
        pos = [start for k, start, _ in _json_children(text, pos) if k == key][-1]  # json.loads keeps the last
    # Values come from this walk, not from `doc`, so repeated keys stay separate rows (and are reported).
    children = list(_json_children(text, pos))
    lines = _lines_at(text, [start for _, start, _ in children])
    return Parsed(_records(((k, v) for k, _, v in children), lines, keyed), keyed=keyed)


def parse_yaml(text: str) -> Parsed:
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        doc = loader.construct_document(node) if node is not None else None
        if node is None:
            return Parsed([])
        path, keyed = choose_layout(doc)
        if path is None:
            return Parsed([], [(node.start_mark.line + 1, "yaml", layout_error(doc))])
        for key in path:
            node = [v for k, v in node.value if loader.construct_object(k) == key][-1]
        if keyed:
            items = [(loader.construct_object(k), loader.construct_object(v, deep=True)) for k, v in node.value]
            lines = [k.start_mark.line + 1 for k, _ in node.value]
        else:
            items = [(i, loader.construct_object(v, deep=True)) for i, v in enumerate(node.value)]
            lines = [v.start_mark.line + 1 for v in node.value]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        return Parsed([], [(line, "yaml", f"invalid YAML: {getattr(e, 'problem', None) or e}")])
    finally:
        loader.dispose()
    return Parsed(_records(items, lines, keyed), keyed=keyed)


PARSERS: dict[str, Callable[[str], Parsed]] = {
    "jsonl": parse_jsonl,
    "json": parse_json,
    "txt": parse_txt,
    "csv": lambda t: parse_delimited(t, ",", csv.QUOTE_MINIMAL),
    "tsv": lambda t: parse_delimited(t, "\t", csv.QUOTE_NONE),
    "yaml": parse_yaml,
}


def choose_layout(doc: Any) -> tuple[Optional[list], bool]:
    """Where a JSON/YAML document keeps its rows: (path of keys to the container, keyed by id?); (None, _) if nowhere.

    A list: its items are the rows (strings are prompts). An object with an `annotations` list: COCO
    captions, the annotations are the rows. An object whose values are all objects: rows keyed by id
    (MJHQ-30K's meta_data.json). An object holding exactly one list ({"prompts": [...]}): that list.
    """
    if isinstance(doc, list):
        return [], False
    if isinstance(doc, dict) and doc:
        if isinstance(doc.get("annotations"), list):
            return ["annotations"], False
        if all(isinstance(v, dict) for v in doc.values()):
            return [], True
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        if len(lists) == 1:
            return [lists[0]], False
    return None, False


def layout_error(doc: Any) -> str:
    if isinstance(doc, dict):
        got = f"an object with keys {list(doc)[:10]}" if doc else "an empty object"
    else:
        got = f"{type(doc).__name__} {doc!r}"[:80]
    return ("expected a list of prompts or of row objects, an object keyed by id whose values are row objects, "
            f"COCO captions ({{\"annotations\": [...]}}) or an object holding one list of rows; got {got}")


def _records(items: Iterator[tuple[Any, Any]], lines: list[int], keyed: bool) -> list[Record]:
    if keyed:
        return [Record(line, value, key=str(key)) for (key, value), line in zip(items, lines)]
    return [Record(line, value, item=key + 1) for (key, value), line in zip(items, lines)]


_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")


def _ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()


def _json_children(text: str, pos: int) -> Iterator[tuple[Any, int, Any]]:
    """(key or index, start offset, value) of each child of the array/object starting at text[pos].

    Only called on text json.loads accepted, so the structure is known to be well formed.
    """
    is_object = text[pos] == "{"
    close = "}" if is_object else "]"
    pos = _ws(text, pos + 1)
    if text[pos] == close:
        return
    index = 0
    while True:
        key: Any = index
        if is_object:
            key, pos = _DECODER.raw_decode(text, pos)
            pos = _ws(text, _ws(text, pos) + 1)  # past ':'
        start = pos
        value, pos = _DECODER.raw_decode(text, pos)
        yield key, start, value
        pos = _ws(text, pos)
        if text[pos] == close:
            return
        pos = _ws(text, pos + 1)  # past ','
        index += 1


def _lines_at(text: str, offsets: list[int]) -> list[int]:
    """1-based line of each (ascending) offset, counting newlines once."""
    lines, line, last = [], 1, 0
    for off in offsets:
        line += text.count("\n", last, off)
        last = off
        lines.append(line)
    return lines
