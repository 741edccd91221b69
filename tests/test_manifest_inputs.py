"""Input images in manifests (edit and inpainting models): every format, every bad row as file:line: field: problem,
the checks of a file, the settings hash, the output size, and load_input's guard against a changed file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_config
from pipeline.errors import ManifestError
from pipeline.inputs import (INPUT_KINDS, InputImage, InputImageError, check_input, load_input,
                             resolve_input)
from pipeline.manifest import PromptRow, read_manifest
from pipeline.tasks import expand, size_for_input

IDENT = {"model": "test"}


@pytest.fixture
def imgs(tmp_path):
    """Tiny files in tmp_path/img: cat.png (64x48 RGB), dog.png (32x32 RGBA), mask.png (64x48 L), tiny.png (8x8),
    wide.png (4100x16), notes.png (text), broken.png (a PNG cut short), a folder; returns the resolved folder."""
    d = tmp_path / "img"
    d.mkdir()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(d / "cat.png")
    Image.new("RGBA", (32, 32), (0, 0, 255, 128)).save(d / "dog.png")
    Image.new("L", (64, 48), 255).save(d / "mask.png")
    Image.new("RGB", (8, 8)).save(d / "tiny.png")
    Image.new("L", (4100, 16)).save(d / "wide.png")
    (d / "notes.png").write_text("hello world, not a picture\n")
    Image.new("RGB", (32, 32)).save(d / "full.png")
    (d / "broken.png").write_bytes((d / "full.png").read_bytes()[:60])  # cut inside the pixel data
    (d / "folder.png").mkdir()
    return d.resolve()


def problems(path, inputs):
    return [str(p) for p in read_manifest(path, inputs=inputs).problems]


# --- good rows, every format --------------------------------------------------------------------------------------


GOOD = {
    "good.jsonl": '{"prompt": "make it blue", "Input Image": "img/cat.png"}\n'
                  '{"prompt": "a hat", "Input Image": "img/dog.png"}\n',
    "good.json": '[\n  {"prompt": "make it blue", "image": "img/cat.png"},\n'
                 '  {"prompt": "a hat", "image": ["img/dog.png"]}\n]',
    "good.yaml": "- {prompt: make it blue, image_path: img/cat.png}\n- prompt: a hat\n  image_path: img/dog.png\n",
    "good.csv": "prompt,image\nmake it blue,img/cat.png\n\"a hat\",img/dog.png\n",
    "good.tsv": "prompt\tSource Image\nmake it blue\timg/cat.png\na hat\timg/dog.png\n",
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_image_rows_in_every_format(name, imgs, write_manifest):
    m = read_manifest(write_manifest(name, GOOD[name]), inputs="image")
    assert not m.problems, m.problems
    cat, dog = (r.images[0] for r in m.rows)
    assert [len(r.images) for r in m.rows] == [1, 1] and all(r.mask is None for r in m.rows)
    assert (cat.role, cat.given, cat.path, cat.width, cat.height, cat.mode) == (
        "image", "img/cat.png", str(imgs / "cat.png"), 64, 48, "RGB")
    assert cat.sha256 == hashlib.sha256((imgs / "cat.png").read_bytes()).hexdigest()
    assert (dog.width, dog.height, dog.mode) == (32, 32, "RGBA")
    assert all("image" not in r.tags and "Input Image" not in r.tags for r in m.rows)


def test_a_txt_manifest_has_no_images_so_every_row_is_an_error_for_an_image_model(imgs, write_manifest):
    path = write_manifest("p.txt", "# prompts\nmake it blue\n\na hat\n")
    assert problems(path, "image") == [
        f"{path}:2: image: missing: this model edits an input image, and this row is a bare prompt (a .txt manifest "
        "holds prompts only); use a JSONL, JSON, YAML, CSV or TSV manifest whose rows have an `image` field",
        f"{path}:4: image: missing: this model edits an input image, and this row is a bare prompt (a .txt manifest "
        "holds prompts only); use a JSONL, JSON, YAML, CSV or TSV manifest whose rows have an `image` field"]
    assert not read_manifest(path).problems  # text-to-image: as before


def test_several_images_as_a_list_or_a_bar_separated_cell(imgs, write_manifest):
    for name, text in [("l.jsonl", '{"prompt": "p", "images": ["img/cat.png", "img/dog.png", "img/cat.png"]}\n'),
                       ("l.yaml", "- prompt: p\n  images: [img/cat.png, img/dog.png, img/cat.png]\n"),
                       ("l.csv", "prompt,images\np,img/cat.png | img/dog.png|img/cat.png\n"),
                       ("l.tsv", "prompt\timages\np\timg/cat.png|img/dog.png|img/cat.png\n")]:
        m = read_manifest(write_manifest(name, text), inputs="images")
        assert not m.problems, (name, m.problems)
        assert [i.given for i in m.rows[0].images] == ["img/cat.png", "img/dog.png", "img/cat.png"], name


def test_image_and_mask_for_an_inpainting_model(imgs, write_manifest):
    path = write_manifest("fill.csv", "prompt,init_image,Mask Path\nfill it,img/cat.png,img/mask.png\n"
                                      f"again,{imgs / 'cat.png'},img/dog.png\n")
    m = read_manifest(path, inputs="image+mask")
    assert not m.problems
    assert [(r.images[0].given, r.mask.role, r.mask.given) for r in m.rows] == [
        ("img/cat.png", "mask", "img/mask.png"), (str(imgs / "cat.png"), "mask", "img/dog.png")]
    assert m.rows[1].mask.mode == "RGBA"  # any mode: load_input converts it to L


def test_job_columns_can_name_the_image_and_mask_columns(imgs, write_manifest):
    from pipeline.config.schema import ColumnsConfig

    path = write_manifest("c.csv", "prompt,photo,matte,image\np,img/cat.png,img/mask.png,unused\n")
    m = read_manifest(path, columns=ColumnsConfig(image="photo", mask="matte"), inputs="image+mask")
    assert not m.problems and m.rows[0].images[0].given == "img/cat.png" and m.rows[0].mask.given == "img/mask.png"
    assert m.rows[0].tags == {"image": "unused"}
    with pytest.raises(ManifestError, match="job.columns.mask=alpha: no such column"):
        read_manifest(path, columns={"mask": "alpha"}, inputs="image+mask")


def test_absolute_and_home_paths(imgs, write_manifest, monkeypatch):
    monkeypatch.setenv("HOME", str(imgs.parent))
    path = write_manifest("abs.jsonl", json.dumps({"prompt": "p", "image": str(imgs / "cat.png")}) + "\n"
                          + json.dumps({"prompt": "q", "image": "~/img/dog.png"}) + "\n")
    m = read_manifest(path, inputs="image")
    assert not m.problems and [r.images[0].path for r in m.rows] == [str(imgs / "cat.png"), str(imgs / "dog.png")]


# --- bad rows: file:line: field: problem ------------------------------------------------------------------------


def test_bad_image_rows_jsonl(imgs, write_manifest):
    path = write_manifest("bad.jsonl", "\n".join([
        '{"prompt": "ok", "image": "img/cat.png"}',
        '{"prompt": "a", "image": "img/missing.png"}',
        '{"prompt": "b", "image": "img/notes.png"}',
        '{"prompt": "c", "image": "img/tiny.png"}',
        '{"prompt": "d"}',
        '{"prompt": "e", "image": ["img/cat.png", "img/dog.png"]}',
        '{"prompt": "f", "image": "img/wide.png"}',
        '{"prompt": "g", "image": "img/folder.png"}',
        '{"prompt": "h", "image": 5}',
        '{"prompt": "i", "image": "img/cat.png", "mask": "img/mask.png"}',
        '{"prompt": "j", "image": "img/broken.png"}',
    ]))
    got = problems(path, "image")
    assert got[:10] == [
        f"{path}:2: image: no such file: {imgs / 'missing.png'}",
        f"{path}:3: image: {imgs / 'notes.png'} is not an image Pillow can read: unknown format (the file starts "
        "with b'hello world,')",
        f"{path}:4: image: {imgs / 'tiny.png'} is 8x8 px: each side must be at least 16 px",
        f"{path}:5: image: missing: this model edits an input image; give its path in an `image` field (relative to "
        "the manifest's folder)",
        f"{path}:6: image: this model takes one input image, got 2",
        f"{path}:7: image: {imgs / 'wide.png'} is 4100x16 px: each side must be at most 4096 px",
        f"{path}:8: image: {imgs / 'folder.png'} is a folder, not an image file",
        f"{path}:9: image: expected a path or a list of paths, got int 5",
        f"{path}:10: mask: this model takes no mask: only an inpainting model (model=...) does; drop the field",
        f"{path}:11: image: {imgs / 'broken.png'}: damaged PNG data: Truncated File Read",
    ] and len(got) == 10
    assert len(read_manifest(path, inputs="image").rows) == 1


def test_bad_image_rows_csv_and_tsv(imgs, write_manifest):
    for name, sep in [("bad.csv", ","), ("bad.tsv", "\t")]:
        path = write_manifest(name, "\n".join(sep.join(r) for r in [
            ("prompt", "image"), ("ok", "img/cat.png"), ("a", "img/missing.png"), ("b", "img/notes.png"),
            ("c", "img/tiny.png"), ("d", ""), ("e", "img/cat.png|img/dog.png"), ("f", "img/cat.png;img/dog.png"),
            ("g", "img/cat.png|")]) + "\n")
        got = problems(path, "image")
        assert got == [
            f"{path}:3: image: no such file: {imgs / 'missing.png'}",
            f"{path}:4: image: {imgs / 'notes.png'} is not an image Pillow can read: unknown format (the file "
            "starts with b'hello world,')",
            f"{path}:5: image: {imgs / 'tiny.png'} is 8x8 px: each side must be at least 16 px",
            f"{path}:6: image: missing: this model edits an input image; give its path in an `image` column "
            "(relative to the manifest's folder)",
            f"{path}:7: image: this model takes one input image, got 2",
            f"{path}:8: image: no such file: {imgs / 'cat.png;img/dog.png'} (separate several images with '|')",
            f"{path}:9: image: has an empty path: 'img/cat.png|'",
        ], name


def test_bad_image_rows_json_and_yaml(imgs, write_manifest):
    j = write_manifest("bad.json", '[\n {"prompt": "ok", "image": "img/cat.png"},\n {"prompt": "a", "image": '
                                   '"img/missing.png"},\n {"prompt": "b"},\n "a bare prompt"\n]')
    assert problems(j, "image") == [
        f"{j}:3: image: no such file: {imgs / 'missing.png'}",
        f"{j}:4: image: missing: this model edits an input image; give its path in an `image` field (relative to "
        "the manifest's folder)",
        f"{j}:5: image: missing: this model edits an input image, and this row is a bare prompt; use a JSONL, JSON, "
        "YAML, CSV or TSV manifest whose rows have an `image` field"]
    y = write_manifest("bad.yaml", "- {prompt: ok, image: img/cat.png}\n- {prompt: a, image: img/tiny.png}\n"
                                   "- prompt: b\n  image: [a.png, b.png, c.png, d.png]\n")
    assert problems(y, "images")[:2] == [
        f"{y}:2: image: {imgs / 'tiny.png'} is 8x8 px: each side must be at least 16 px",
        f"{y}:3: image: this model takes at most 3 input images, got 4"]


def test_an_image_for_a_text_to_image_model_is_a_row_error(imgs, write_manifest):
    path = write_manifest("t.csv", "prompt,image\na,img/cat.png\nb,\n")
    assert problems(path, "text") == [
        f"{path}:2: image: this model is text-to-image: it takes no input image; use an edit model (model=...) or "
        "drop the column"]
    j = write_manifest("t.jsonl", '{"prompt": "a", "source_image": "img/missing.png", "mask": "m.png"}\n')
    assert problems(j, "text") == [
        f"{j}:1: source_image: this model is text-to-image: it takes no input image; use an edit model (model=...) "
        "or drop the field",
        f"{j}:1: mask: this model takes no mask: only an inpainting model (model=...) does; drop the field"]


def test_an_inpainting_row_without_a_mask(imgs, write_manifest):
    path = write_manifest("m.jsonl", '{"prompt": "a", "image": "img/cat.png"}\n'
                                     '{"prompt": "b", "image": "img/cat.png", "mask": "img/gone.png"}\n'
                                     '{"prompt": "c", "image": "img/cat.png", "mask": ["img/mask.png"]}\n')
    assert problems(path, "image+mask") == [
        f"{path}:1: mask: missing: this inpainting model needs a mask (white: repaint, black: keep); give its path "
        "in a `mask` field",
        f"{path}:2: mask: no such file: {imgs / 'gone.png'}",
        f"{path}:3: mask: expected a path (a string), got list ['img/mask.png']"]


def test_bad_rows_past_the_limit_are_checked_and_on_error_counts_them(imgs, write_manifest):
    path = write_manifest("lim.jsonl", '{"prompt": "a", "image": "img/cat.png"}\n'
                                       '{"prompt": "b", "image": "img/cat.png"}\n{"prompt": "c", "image": "x.png"}\n')
    m = read_manifest(path, limit=1, inputs="image")
    assert len(m.rows) == 1 and m.bad_rows == 1 and [p.line for p in m.problems] == [3]


def test_coco_images_and_image_id_are_untouched(write_manifest):
    path = write_manifest("coco.json", json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}],
                                                   "annotations": [{"image_id": 1, "id": 5, "caption": "a cat"}]}))
    m = read_manifest(path)
    assert not m.problems and m.rows[0].tags == {"image_id": 1} and m.rows[0].images == ()


def test_each_file_is_checked_once_however_many_rows_share_it(imgs, write_manifest, monkeypatch):
    import pipeline.inputs as inputs

    calls = []
    real = inputs.check_input
    monkeypatch.setattr(inputs, "check_input", lambda *a: calls.append(a) or real(*a))
    rows = [{"prompt": f"p{i}", "image": "img/cat.png" if i % 2 else "./img/../img/cat.png"} for i in range(2000)]
    rows += [{"prompt": "x", "image": "img/missing.png"}] * 3
    m = read_manifest(write_manifest("many.jsonl", "\n".join(map(json.dumps, rows))), inputs="image")
    assert len(m.rows) == 2000 and len(m.problems) == 3 and len(calls) == 2  # cat.png once, missing.png once
    assert {r.images[0].given for r in m.rows} == {"img/cat.png", "./img/../img/cat.png"}  # as each row wrote it


def test_input_kinds_match_the_family_registry():
    from pipeline.families import INPUT_KINDS as FAMILY_KINDS, inputs_of

    assert INPUT_KINDS == FAMILY_KINDS
    with pytest.raises(ValueError, match="inputs must be one of"):
        read_manifest(Path(__file__).parent / "data/manifests/color_val.txt", inputs="video")
    assert inputs_of("flux") == "text" and inputs_of("flux-fill") == "image+mask"


def test_load_manifest_asks_the_family_for_its_input_kind(imgs, write_manifest):
    from pipeline.runner import load_manifest

    path = write_manifest("run.jsonl", '{"prompt": "a", "image": "img/cat.png"}\n')
    cfg = run_config([f"job.manifest={path}"])
    with pytest.raises(ManifestError, match="this model is text-to-image"):
        load_manifest(cfg)
    cfg.model.family = "flux-kontext"
    assert load_manifest(cfg).rows[0].images[0].width == 64


# --- check_input, load_input --------------------------------------------------------------------------------------


def test_check_input_resolves_against_the_manifest_folder(imgs):
    got = check_input("cat.png", imgs, "image")
    assert got.path == str(imgs / "cat.png") and (got.width, got.height) == (64, 48)
    assert resolve_input("../img/cat.png", imgs) == imgs / "cat.png"
    with pytest.raises(InputImageError, match=r"is 8x8 px: each side must be at least 16 px"):
        check_input(str(imgs / "tiny.png"), Path("/nowhere"), "mask")
    assert isinstance(InputImageError("x"), ValueError)


def test_exif_orientation_gives_the_upright_size(imgs):
    im = Image.new("RGB", (64, 32))
    exif = im.getexif()
    exif[0x0112] = 6  # turned a quarter: upright it is 32 wide, 64 high
    im.save(imgs / "turned.jpg", exif=exif)
    got = check_input("turned.jpg", imgs, "image")
    assert (got.width, got.height) == (32, 64) and load_input(got).size == (32, 64)


def test_load_input_converts_and_refuses_a_changed_file(imgs):
    image, mask = check_input("dog.png", imgs, "image"), check_input("dog.png", imgs, "mask")
    assert load_input(image).mode == "RGB" and load_input(mask).mode == "L" and load_input(mask).size == (32, 32)
    Image.new("RGBA", (32, 32), (1, 2, 3, 4)).save(imgs / "dog.png")
    with pytest.raises(InputImageError, match=rf"{imgs / 'dog.png'} \(image 'dog.png'\) changed after the manifest "
                                              r"was checked \(sha256 [0-9a-f]{12}\.\.\. then"):
        load_input(image)
    (imgs / "dog.png").unlink()
    with pytest.raises(InputImageError, match="cannot be read any more"):
        load_input(mask)


# --- tasks: hash, batches, params, size ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfgs():
    return run_config(["sampler.seed=10"]), run_config(["sampler.seed=10", "sampler.height=512"])


def old_hash(task) -> str:
    """The settings hash as computed before input images existed."""
    keys = ("prompt", "negative_prompt", "seed", "steps", "guidance", "true_cfg_scale", "height", "width",
            "max_sequence_length")
    settings = {k: getattr(task, k) for k in keys}
    payload = json.dumps(IDENT, sort_keys=True) + json.dumps(settings, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def test_text_rows_hash_and_params_are_as_before(cfgs, imgs, write_manifest):
    m = read_manifest(write_manifest("t.jsonl", '{"prompt": "a", "seed": 3}\n'))
    task = next(expand(m.rows, cfgs[0], IDENT))
    assert task.settings_hash == old_hash(task) and "inputs" not in task.params()
    assert list(task.params()) == ["prompt", "negative_prompt", "seed", "steps", "guidance", "true_cfg_scale",
                                   "height", "width", "max_sequence_length"]


def test_the_input_file_is_in_the_settings_hash_batch_and_params(cfgs, imgs, write_manifest):
    path = write_manifest("e.jsonl", '{"prompt": "a", "seed": 3, "image": "img/cat.png", "width": 64, '
                                     '"height": 48}\n{"prompt": "a", "seed": 3, "id": "b", "image": "img/dog.png", '
                                     '"width": 64, "height": 48}\n')
    first = list(expand(read_manifest(path, inputs="image").rows, cfgs[0], IDENT))
    assert first[0].settings_hash != old_hash(first[0])  # the same settings without the image hash otherwise
    assert first[0].batch_key != first[1].batch_key  # other inputs: another pipeline call
    cat = first[0].row.images[0]
    assert first[0].params()["inputs"] == [{"role": "image", "path": "img/cat.png", "sha256": cat.sha256,
                                            "width": 64, "height": 48}]
    Image.new("RGB", (64, 48), (10, 200, 10)).save(imgs / "cat.png")  # same name, other pixels
    again = list(expand(read_manifest(path, inputs="image").rows, cfgs[0], IDENT))
    assert again[0].stem == first[0].stem and again[0].settings_hash != first[0].settings_hash
    assert again[1].settings_hash == first[1].settings_hash  # dog.png unchanged


def test_a_mask_is_in_the_hash_too(cfgs, imgs, write_manifest):
    path = write_manifest("f.jsonl", '{"prompt": "a", "seed": 3, "image": "img/cat.png", "mask": "img/mask.png"}\n')
    before = next(expand(read_manifest(path, inputs="image+mask").rows, cfgs[0], IDENT))
    Image.new("L", (64, 48), 0).save(imgs / "mask.png")
    after = next(expand(read_manifest(path, inputs="image+mask").rows, cfgs[0], IDENT))
    assert before.settings_hash != after.settings_hash and before.batch_key != after.batch_key
    assert [i["role"] for i in after.params()["inputs"]] == ["image", "mask"]


def test_output_size_follows_the_first_input_image():
    assert size_for_input(1200, 800, 1024 * 1024) == (832, 1248)  # 3:2 at about 1024*1024 pixels
    assert size_for_input(800, 1200, 1024 * 1024) == (1248, 832)
    assert size_for_input(1024, 1024, 1328 * 1328) == (1328, 1328)
    assert size_for_input(1200, 800, 1024 * 1024, height=512) == (512, 768)  # one side set: the other follows
    assert size_for_input(1200, 800, 1024 * 1024, width=512) == (336, 512)  # 341.3 -> 336
    assert size_for_input(16, 4096, 1024 * 1024) == (4096, 64)  # kept in 16..4096
    assert size_for_input(4096, 16, 64 * 64) == (16, 1024)
    assert size_for_input(100, 100, 1, height=32, width=48) == (32, 48)


def test_tasks_take_the_size_from_the_input_unless_set(cfgs, imgs, write_manifest):
    path = write_manifest("s.jsonl", '{"prompt": "a", "image": "img/cat.png"}\n'
                                     '{"prompt": "b", "image": "img/cat.png", "width": 256}\n'
                                     '{"prompt": "c", "image": "img/cat.png", "width": 256, "height": 64}\n')
    rows = read_manifest(path, inputs="image").rows
    rows.append(PromptRow(index=3, line=4, prompt="d", id="d"))  # a text row among them keeps the model's size
    plain, sampler_height = cfgs
    rec = plain.model.recommended
    got = [(t.height, t.width) for t in expand(rows, plain, IDENT)]
    assert got[0] == size_for_input(64, 48, rec.height * rec.width)
    assert got[1:] == [(192, 256), (64, 256), (rec.height, rec.width)]
    assert [(t.height, t.width) for t in expand(rows, sampler_height, IDENT)][0] == (512, 688)  # 682.7 -> 688
    photo = InputImage("image", "p.jpg", "/x/p.jpg", "0" * 64, width=1200, height=800, mode="RGB")
    row = PromptRow(index=0, line=1, prompt="p", id="p", images=(photo,))
    assert [(t.height, t.width) for t in expand([row], plain, IDENT)] == [
        size_for_input(1200, 800, rec.height * rec.width)]


def test_run_json_lists_each_input_file_once(imgs, write_manifest):
    from pipeline.record import input_files

    path = write_manifest("r.jsonl", '{"prompt": "a", "image": "img/cat.png", "mask": "img/mask.png"}\n'
                                     '{"prompt": "b", "image": "./img/cat.png", "mask": "img/mask.png"}\n')
    m = read_manifest(path, inputs="image+mask")
    files = input_files(m)
    assert [(f["path"], f["width"], f["height"]) for f in files] == [(str(imgs / "cat.png"), 64, 48),
                                                                     (str(imgs / "mask.png"), 64, 48)]
    assert input_files(read_manifest(write_manifest("t.txt", "a\n"))) == []


def test_the_grid_shows_each_image_after_its_inputs(tmp_path):
    """An edit run's contact sheet: per image its input(s) then the image, one row part each."""
    from pipeline.outputs.grid import THUMB, write_grid

    red, blue, green = (tmp_path / f"{n}.png" for n in ("in", "a", "b"))
    Image.new("RGB", (32, 32), (255, 0, 0)).save(red)
    Image.new("RGB", (32, 32), (0, 0, 255)).save(blue)
    Image.new("RGB", (32, 32), (0, 255, 0)).save(green)
    out = write_grid([blue, green], tmp_path / "grid.png", inputs={blue: [red], green: [red]})
    with Image.open(out) as sheet:
        assert sheet.size[0] == 4 * THUMB  # input, image, input, image
        assert [sheet.getpixel((x * THUMB + THUMB // 2, THUMB // 2)) for x in range(4)] == [
            (255, 0, 0), (0, 0, 255), (255, 0, 0), (0, 255, 0)]
    plain = write_grid([blue, green], tmp_path / "plain.png")
    with Image.open(plain) as sheet:
        assert sheet.size[0] == 2 * THUMB


def test_a_changed_input_is_named_when_a_run_refuses_to_overwrite():
    from pipeline.outputs.existing import describe_differences

    side = {"inputs": [{"role": "image", "path": "shots/mug.png", "sha256": "a" * 64}], "settings_hash": "x"}
    new = {"inputs": [{"role": "image", "path": "shots/mug.png", "sha256": "b" * 64}], "settings_hash": "y"}
    assert describe_differences(side, new) == (f"input images image mug.png ({'a' * 12}) -> "
                                               f"image mug.png ({'b' * 12})")
