"""Manifests: every format parses; every kind of bad row is reported as file:line: field: problem."""

from __future__ import annotations

import pytest

from conftest import ROOT
from pipeline.errors import ManifestError
from pipeline.manifest import read_manifest


def test_demo_manifest_is_valid_and_has_overrides():
    m = read_manifest(ROOT / "jobs/demo.jsonl")
    assert not m.problems and m.format == "jsonl" and len(m.rows) == 6
    by_id = {r.id: r for r in m.rows}
    assert by_id["lighthouse"].seed == 42 and by_id["ramen"].steps == 6
    assert by_id["astronaut"].num_images == 2 and by_id["ramen"].tags == {"set": "product"}
    assert len(m.sha256) == 64


def test_csv_partiprompts_style_columns():
    m = read_manifest(ROOT / "jobs/example.csv")
    assert not m.problems and m.format == "csv"
    assert [r.prompt for r in m.rows][2] == 'the text "SALE" on a shop window'
    assert m.rows[0].seed == 7 and m.rows[1].seed is None and m.rows[2].seed == 11
    assert m.rows[0].tags == {"Category": "Simple Detail", "Challenge": "Colors"}
    assert [r.line for r in m.rows] == [2, 3, 4]
    assert [r.id for r in m.rows] == ["00000", "00001", "00002"]


def test_tsv():
    m = read_manifest(ROOT / "jobs/example.tsv")
    assert not m.problems and [r.id for r in m.rows] == ["teapot", "boat"]
    assert m.rows[0].steps == 6 and m.rows[1].steps is None
    assert m.rows[1].tags == {"tags_note": "evaluation"}


def test_txt_skips_comments_and_blank_lines_keeping_line_numbers():
    m = read_manifest(ROOT / "jobs/example.txt")
    assert [r.line for r in m.rows] == [2, 4, 5]
    assert m.rows[1].prompt == "a glass of orange juice on a marble counter"
    assert [r.index for r in m.rows] == [0, 1, 2]


def test_yaml_strings_and_mappings_with_lines():
    m = read_manifest(ROOT / "jobs/example.yaml")
    assert not m.problems and len(m.rows) == 3
    assert m.rows[0].prompt == "a mountain lake at sunset" and m.rows[0].line == 2
    assert m.rows[1].id == "tiny-house" and m.rows[1].line == 3 and m.rows[1].tags == {"set": "product", "angle": "front"}
    assert m.rows[2].num_images == 2 and m.rows[2].negative_prompt == "cartoon, lowres"


def test_limit_takes_first_rows():
    assert len(read_manifest(ROOT / "jobs/demo.jsonl", limit=2).rows) == 2


BAD_JSONL = "\n".join([
    '{"id": "ok", "prompt": "fine"}',
    '{"id": "nop"}',
    '{"prompt": "a", "steps": "four"}',
    '{"prompt": "b", "stesp": 4}',
    '{"prompt": "c", "height": 1000}',
    '{"prompt": "d", broken json',
    '{"id": "ok", "prompt": "again"}',
    '{"prompt": "e", "seed": 1.5}',
    '["not", "an", "object"]',
    '{"prompt": "f", "id": "has space"}',
    '{"prompt": "   "}',
    '{"prompt": "g", "num_images": 0}',
])


def test_each_bad_row_kind_has_its_file_line_field_message(write_manifest):
    path = write_manifest("bad.jsonl", BAD_JSONL)
    m = read_manifest(path)
    got = [str(p) for p in m.problems]
    expected = [
        f"{path}:2: prompt: missing",
        f"{path}:3: steps: expected an integer, got str 'four'",
        f"{path}:4: stesp: unknown field; did you mean 'steps'?",
        f"{path}:5: height: must be a multiple of 16",
        f"{path}:6: json: invalid JSON",
        f"{path}:7: id: duplicate id 'ok' (first used on line 1)",
        f"{path}:8: seed: expected an integer, got float 1.5",
        f"{path}:9: row: expected an object with a 'prompt', got list",
        f"{path}:10: id: 'has space' is not usable in a file name",
        f"{path}:11: prompt: is empty",
        f"{path}:12: num_images: must be in 1..64, got 0",
    ]
    assert len(got) == len(expected), got
    for line, want in zip(got, expected):
        assert line.startswith(want), (line, want)
    assert [r.id for r in m.rows] == ["ok"]


def test_bad_csv_cells_and_header_typos(write_manifest):
    path = write_manifest("bad.csv", "prompt,steps,seed\nfine,4,1\nbad,four,2\nshort row\n")
    got = [str(p) for p in read_manifest(path).problems]
    assert got[0] == f"{path}:3: steps: expected an integer, got 'four'"
    assert got[1] == f"{path}:4: row: has 1 cells, header has 3"
    typo = write_manifest("typo.csv", "prompt,negativ_prompt\nx,y\n")
    assert "did you mean 'negative_prompt'" in str(read_manifest(typo).problems[0])
    noprompt = write_manifest("noprompt.csv", "text,seed\nx,1\n")
    assert "no 'prompt' (or 'Prompt') column" in str(read_manifest(noprompt).problems[0])


def test_bad_yaml_reports_line(write_manifest):
    path = write_manifest("bad.yaml", "- a\n- prompt: [unclosed\n")
    p = read_manifest(path).problems[0]
    assert p.path == str(path) and p.field == "yaml" and p.line >= 2
    path2 = write_manifest("map.yaml", "prompt: not a list\n")
    assert "expected a list" in str(read_manifest(path2).problems[0])
    path3 = write_manifest("types.yaml", "- prompt: ok\n- prompt: x\n  steps: many\n")
    assert str(read_manifest(path3).problems[0]).startswith(f"{path3}:2: steps: expected an integer")


def test_automatic_id_colliding_with_explicit_id(write_manifest):
    path = write_manifest("ids.jsonl", '{"id": "00001", "prompt": "a"}\n{"prompt": "b"}\n')
    assert "automatic id collides with the id '00001'" in str(read_manifest(path).problems[0])


def test_unusable_files_raise_with_the_fix(tmp_path, write_manifest):
    with pytest.raises(ManifestError, match="file not found"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(ManifestError, match=r"(?s)unknown manifest format '.xml'.*Use one of"):
        read_manifest(write_manifest("p.xml", "<x/>"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ManifestError, match="not UTF-8"):
        read_manifest(bad)


def test_row_index_counts_bad_rows_so_seeds_do_not_shift(write_manifest):
    path = write_manifest("idx.jsonl", '{"prompt": "a"}\n{"nope": 1}\n{"prompt": "c"}\n')
    m = read_manifest(path)
    assert [(r.index, r.line) for r in m.rows] == [(0, 1), (2, 3)]
