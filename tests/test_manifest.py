"""Manifests: every format parses; every kind of bad row is reported as file:line: field: problem."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from pipeline.config.schema import ColumnsConfig
from pipeline.errors import ManifestError
from pipeline.manifest import Manifest, PromptRow, RowProblem, read_manifest  # noqa: F401  (the public names)

DATA = ROOT / "tests/data/manifests"


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
        f"{path}:4: stesp: looks like a typo of 'steps': rename it 'steps'",
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
    assert str(read_manifest(typo).problems[0]).startswith(
        f"{typo}:1: negativ_prompt: column looks like a typo of 'negative_prompt': rename it 'negative_prompt'")
    noprompt = write_manifest("noprompt.csv", "words,seed\nx,1\n")
    m = read_manifest(noprompt)
    assert str(m.problems[0]).startswith(f"{noprompt}:1: header: no prompt column; columns are ['words', 'seed']")
    assert "job.columns.prompt" in m.problems[0].message and m.bad_rows == 1 and not m.rows


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


# --- the evaluation sets as published (tests/data/manifests: a few rows each, in the real layout) ---------------


def test_partiprompts_tsv_cells_are_literal():
    m = read_manifest(DATA / "PartiPrompts.tsv")
    assert not m.problems and m.format == "tsv" and m.total_rows == 4
    assert [r.prompt for r in m.rows][:3] == ["bond", "42", "a shiba inu"]
    # TSV has no quoting: the published prompt starts with a quote and must keep it.
    assert m.rows[3].prompt.startswith('"G I G G L E" painted')
    assert m.rows[0].tags == {"Category": "Abstract", "Challenge": "Basic",
                              "Note": "Biology-inspired concepts with multiple meanings"}
    assert m.rows[2].tags == {"Category": "Animals", "Challenge": "Basic"}  # empty Note: no tag
    assert [r.id for r in m.rows] == ["00000", "00001", "00002", "00003"]


def test_drawbench_csv_prompts_column():
    m = read_manifest(DATA / "DrawBench.csv")
    assert not m.problems and [r.line for r in m.rows] == [2, 3, 4]
    assert m.rows[1].prompt == "A couch on the left of a chair, and a cat."
    assert [r.tags for r in m.rows] == [{"Category": "Colors"}, {"Category": "Positional"}, {"Category": "Text"}]


def test_geneval_jsonl_keeps_tag_include_exclude_as_tags():
    m = read_manifest(DATA / "evaluation_metadata.jsonl")
    assert not m.problems and [r.prompt for r in m.rows][0] == "a photo of a bench"
    assert m.rows[0].tags == {"tag": "single_object", "include": [{"class": "bench", "count": 1}]}
    assert m.rows[2].tags["exclude"] == [{"class": "dog", "count": 3}]
    assert m.rows[3].tags["include"][0]["color"] == "red"


def test_t2i_compbench_txt_and_hpsv2_json_list_of_strings():
    txt = read_manifest(DATA / "color_val.txt")
    assert [r.prompt for r in txt.rows] == ["a green bench and a blue bowl", "a red car and a white sheep",
                                            "a pink elephant and a brown giraffe"]
    m = read_manifest(DATA / "anime.json")
    assert not m.problems and m.format == "json" and len(m.rows) == 3
    assert m.rows[1].prompt == "Walter White dressed as a medieval-style king."
    assert [r.id for r in m.rows] == ["00000", "00001", "00002"] and {r.line for r in m.rows} == {1}


def test_mjhq_meta_data_json_is_keyed_by_image_id():
    m = read_manifest(DATA / "meta_data.json")
    assert not m.problems and len(m.rows) == 3
    assert m.rows[0].id == "0b3a9c1f2e4d5a6b7c8d9e0f1a2b3c4d5e6f7a8b" and m.rows[0].explicit_id
    assert m.rows[0].prompt == "a portrait of an old fisherman, dramatic light"
    assert [r.tags for r in m.rows] == [{"category": "people"}, {"category": "food"}, {"category": "animals"}]
    assert [r.line for r in m.rows] == [2, 6, 10]  # where each element starts


def test_coco_captions_use_the_annotation_id_and_keep_image_id_as_a_tag():
    m = read_manifest(DATA / "captions_val2014.json")
    # image 179765 has two captions: its image_id cannot be the row id, the annotation id can.
    assert not m.problems and [r.id for r in m.rows] == ["38", "182", "401"]
    assert m.rows[0].prompt == "A black Honda motorcycle parked in front of a garage."
    assert [r.tags for r in m.rows] == [{"image_id": 179765}, {"image_id": 179765}, {"image_id": 190236}]


def test_json_rows_objects_single_list_and_lines(write_manifest):
    rows = [{"prompt": "a cat", "seed": 3}, {"prompt": "a dog", "id": 7, "style": {"medium": "oil"}}]
    m = read_manifest(write_manifest("rows.json", json.dumps(rows, indent=2)))
    assert not m.problems
    assert [(r.prompt, r.seed, r.id) for r in m.rows] == [("a cat", 3, "00000"), ("a dog", None, "7")]
    assert [r.line for r in m.rows] == [2, 6] and m.rows[1].tags == {"style": {"medium": "oil"}}
    m = read_manifest(write_manifest("wrapped.json", '{"version": 2, "prompts": ["a", "b"]}'))
    assert [r.prompt for r in m.rows] == ["a", "b"]
    # Minified JSON: every element starts on line 1, so a message names the element too.
    m = read_manifest(write_manifest("min.json", '[{"prompt": "a"}, {"prompt": "b", "steps": "x"}]'))
    assert str(m.problems[0]).endswith("steps: expected an integer, got str 'x' (item 2)")
    p = read_manifest(write_manifest("one.json", '{"prompt": "a single row"}')).problems[0]
    assert p.line == 1 and p.field == "json" and "expected a list of prompts" in p.message
    p = read_manifest(write_manifest("broken.json", '[\n  "a",\n  "b"\n  "c"\n]')).problems[0]
    assert (p.line, p.field) == (4, "json") and "invalid JSON" in p.message


# --- names, mapping, tags -------------------------------------------------------------------------------------


def test_prompt_id_and_negative_names_are_recognised_in_any_case(write_manifest):
    header = "Prompt_ID,Caption,Text,Negative,Guidance_Scale"
    m = read_manifest(write_manifest("a.csv", f"{header}\np1,a cat,note,blurry,2.5\n"))
    assert not m.problems  # Prompt_ID is the id, never "a typo of prompt"
    r = m.rows[0]
    assert (r.id, r.prompt, r.negative_prompt, r.guidance) == ("p1", "a cat", "blurry", 2.5)
    assert r.tags == {"Text": "note"}  # the lower-priority prompt candidate is kept as a tag
    m = read_manifest(write_manifest("b.jsonl", '{"prompt_id": 7, "TEXT": "a dog", "Seed": 5, "uid": "u"}\n'))
    assert not m.problems and (m.rows[0].id, m.rows[0].prompt, m.rows[0].seed) == ("7", "a dog", 5)
    assert m.rows[0].tags == {"uid": "u"}


def test_columns_mapping_and_its_error_for_a_missing_column(write_manifest):
    path = write_manifest("m.csv", "description,key,avoid,prompt\na cat,k1,blurry,unused\n")
    m = read_manifest(path, columns={"prompt": "description", "id": "KEY", "negative_prompt": "avoid"})
    r = m.rows[0]
    assert not m.problems and (r.prompt, r.id, r.negative_prompt, r.tags) == ("a cat", "k1", "blurry",
                                                                               {"prompt": "unused"})
    m = read_manifest(path, columns=ColumnsConfig(prompt="description"))  # id and negative_prompt: detected
    assert m.rows[0].prompt == "a cat" and m.rows[0].id == "00000"
    with pytest.raises(ManifestError) as e:
        read_manifest(DATA / "PartiPrompts.tsv", columns=ColumnsConfig(prompt="Prompts"))
    assert (f"{DATA / 'PartiPrompts.tsv'}: job.columns.prompt=Prompts: no such column; "
            "columns are ['Prompt', 'Category', 'Challenge', 'Note']") in str(e.value)
    with pytest.raises(ManifestError, match="job.columns.id=uid: no such column; this TXT file has no named"):
        read_manifest(DATA / "color_val.txt", columns={"id": "uid"})
    keyed = read_manifest(DATA / "meta_data.json", columns={"id": "category"})  # the key is then a tag
    assert keyed.rows[0].id == "people" and keyed.rows[0].tags == {"key": "0b3a9c1f2e4d5a6b7c8d9e0f1a2b3c4d5e6f7a8b"}


def test_unknown_fields_become_tags_in_every_format(write_manifest):
    y = read_manifest(write_manifest("t.yaml", "- prompt: a cat\n  style: {medium: oil, era: [1900, 1920]}\n"))
    assert not y.problems and y.rows[0].tags == {"style": {"medium": "oil", "era": [1900, 1920]}}
    j = read_manifest(write_manifest("t.jsonl", '{"prompt": "a", "source": "mine", "tags": {"set": "x"}}\n'))
    assert not j.problems and j.rows[0].tags == {"source": "mine", "set": "x"}


def test_near_miss_of_a_setting_is_a_typo_problem_not_a_tag(write_manifest):
    path = write_manifest("typos.jsonl", "\n".join([
        '{"prompt": "a", "stpes": 4}',
        '{"prompt": "b", "sead": 3}',
        '{"prompt": "c", "negative_promt": "blurry"}',
        '{"prompt": "d", "weight": 0.5, "prompt_id": "d1"}',  # 0.5 is no height: a tag; prompt_id: the id
    ]))
    m = read_manifest(path)
    assert [(p.line, p.field) for p in m.problems] == [(1, "stpes"), (2, "sead"), (3, "negative_promt")]
    assert m.problems[2].message.startswith("looks like a typo of 'negative_prompt': rename it 'negative_prompt'")
    assert all("did you mean" not in p.message and "become tags" not in p.message for p in m.problems)
    assert m.rows[0].id == "d1" and m.rows[0].tags == {"weight": 0.5}
    csv_typo = read_manifest(write_manifest("typo.csv", "prompt,stpes\na,4\nb,\n"))
    assert [str(p) for p in csv_typo.problems] == [
        f"{csv_typo.path}:1: stpes: column looks like a typo of 'steps': rename it 'steps' "
        "(a column whose name is not this close to a setting is kept as a tag)"]
    assert csv_typo.bad_rows == 2 and not csv_typo.rows


# --- row indices, limit, counts, seeds --------------------------------------------------------------------------


def test_a_broken_row_keeps_its_index_so_later_ids_do_not_shift(write_manifest):
    lines = ['{"prompt": "good1"}', '{"prompt": "good2"}', '{"prompt": "good3"}']
    fixed = read_manifest(write_manifest("fixed.jsonl", "\n".join(lines)))
    broken = read_manifest(write_manifest("broken.jsonl", "\n".join([lines[0], '{"prompt": "good2",', lines[2]])))
    assert [(p.line, p.field) for p in broken.problems] == [(2, "json")]
    assert broken.problems[0].message.startswith("invalid JSON at column 20")
    assert [(r.id, r.index) for r in broken.rows] == [(r.id, r.index) for r in fixed.rows if r.prompt != "good2"]
    assert broken.rows[-1].id == "00002" and broken.total_rows == 3
    csv_broken = read_manifest(write_manifest("b.csv", "prompt,seed\na,1\nb,2,extra\nc,3\n"))
    assert [(r.prompt, r.index, r.id) for r in csv_broken.rows] == [("a", 0, "00000"), ("c", 2, "00002")]


def test_limit_still_checks_every_row(write_manifest):
    rows = [f'{{"prompt": "p{i}"}}' for i in range(1, 13)]
    rows[10] = '{"prompt": "p11", "steps": "many"}'
    m = read_manifest(write_manifest("twelve.jsonl", "\n".join(rows)), limit=3)
    assert [r.prompt for r in m.rows] == ["p1", "p2", "p3"]
    assert [(p.line, p.field) for p in m.problems] == [(11, "steps")]
    assert m.total_rows == 12 and m.bad_rows == 1


def test_bad_rows_counts_rows_not_problems(write_manifest):
    m = read_manifest(write_manifest("two.jsonl", '{"prompt": "a", "steps": 0, "height": 7, "seed": "x"}\n'
                                                  '{"id": "no prompt"}\n{"prompt": "fine"}\n'))
    assert len(m.problems) == 5 and m.bad_rows == 2 and len(m.rows) == 1


def test_seed_minus_one_means_random_in_every_format(write_manifest):
    for name, text in [("s.jsonl", '{"prompt": "a", "seed": -1}\n'), ("s.csv", "prompt,Seed\na,-1\n"),
                       ("s.yaml", "- {prompt: a, seed: -1}\n"), ("s.json", '[{"prompt": "a", "seed": -1}]')]:
        m = read_manifest(write_manifest(name, text))
        assert not m.problems and m.rows[0].seed == -1, name
    m = read_manifest(write_manifest("s2.jsonl", '{"prompt": "a", "seed": -2}\n'))
    assert "or -1 for a random seed, got -2" in str(m.problems[0])
