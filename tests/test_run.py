"""End-to-end tiny runs: files and their contents, determinism, resume, bad rows, failures."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import ROOT, run_config
from pipeline import runner
from pipeline.errors import ManifestError
from pipeline.outputs.images import read_png_params
from pipeline.runner import run_job
from pipeline.tasks import batches, expand, run_identity
from pipeline.quantization import resolve_plan

DEMO_FILES = ["cat_0", "lighthouse_42", "ramen_2", "astronaut_3", "astronaut_4", "robot-wide_4", "neon_5"]


def run(tmp_path, *overrides, name="out"):
    cfg = run_config(["job.progress=none", *overrides])
    out = tmp_path / name
    return run_job(cfg, out), out


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    record, out = run(tmp)
    return record, out


def test_demo_run_writes_pngs_sidecars_index_grid_and_run_json(demo_run):
    record, out = demo_run
    assert sorted(p.stem for p in out.glob("*.png") if p.name != "grid.png") == sorted(DEMO_FILES)
    assert sorted(p.stem for p in out.glob("*.json") if p.name != "run.json") == sorted(DEMO_FILES)
    run_json = json.loads((out / "run.json").read_text())
    assert run_json == json.loads(json.dumps(record, default=str))
    assert run_json["status"] == "complete"
    assert run_json["counts"] == {"planned": 7, "made": 7, "skipped_existing": 0, "failed": 0, "skipped_rows": 0}
    import hashlib

    assert run_json["manifest"]["sha256"] == hashlib.sha256((ROOT / "jobs/demo.jsonl").read_bytes()).hexdigest()
    assert run_json["config"]["model"]["name"] == "tiny-flux"
    assert run_json["versions"]["torch"] and run_json["versions"]["diffusers"] and run_json["versions"]["hydra-core"]
    assert run_json["device"].startswith("cpu") and run_json["dtype"] == "float32"
    assert run_json["memory"]["peak_rss_bytes"] > 100 * 2**20
    assert len(run_json["images"]) == 7 and all(i["time_s"] > 0 for i in run_json["images"])
    assert run_json["timing"]["total_s"] > 0 and run_json["timing"]["model_load_s"] > 0
    plan, summary = run_json["quantization"]["plan"], run_json["quantization"]["summary"]
    assert (plan["enabled"], plan["precision"], plan["rank"], plan["decided_by"]) == (True, "int4", 32, "auto")
    assert summary["applied"] and summary["source"] == "calibrated" and summary["layers_swapped"] == 30
    assert summary["bytes_after"] < summary["bytes_before"]
    # 2 double blocks x (8 W4A4 + 2 AWQ modulation) + 2 single blocks x (4 + 1)
    assert len(summary["layers"]) == 30 and 0 < summary["layer_error_mean"] <= summary["layer_error_max"] < 0.5
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(i["file"] for i in index) == sorted(f"{s}.png" for s in DEMO_FILES)
    grid = Image.open(out / "grid.png")
    assert grid.width >= 3 * 128 and grid.height >= 3 * 128


def test_sidecar_and_png_chunk_hold_the_generation_parameters(demo_run):
    _, out = demo_run
    side = json.loads((out / "neon_5.json").read_text())
    assert side["prompt"] == "the word hello written in neon letters on a brick wall"
    assert side["negative_prompt"] == "blurry, low quality" and side["true_cfg_scale"] == 3.0
    assert (side["seed"], side["steps"], side["guidance"], side["height"], side["width"]) == (5, 4, 3.5, 128, 128)
    assert side["model"] == "tiny-flux" and side["quantization"]["decided_by"] == "auto"
    assert (side["quantization"]["precision"], side["quantization"]["rank"], side["quantization"]["act_unsigned"]) == ("int4", 32, True)
    assert side["manifest_line"] == 6 and side["row_index"] == 5
    # the per-layer report is run.json's, once; the sidecar keeps the totals (it was 8.5 KB a sidecar)
    summary = side["quantization"]["summary"]
    assert "layers" not in summary and summary["layers_in"] == "run.json" and summary["layers_swapped"] == 30
    assert (out / "neon_5.json").stat().st_size < 4096
    embedded = read_png_params(out / "neon_5.png")
    assert embedded["seed"] == 5 and embedded["prompt"] == side["prompt"]
    assert embedded["settings_hash"] == side["settings_hash"]
    text = Image.open(out / "neon_5.png").text["parameters"]
    assert text.splitlines()[1] == "Negative prompt: blurry, low quality"
    assert "Steps: 4" in text and "Seed: 5" in text and "Size: 128x128" in text
    wide = Image.open(out / "robot-wide_4.png")
    assert wide.size == (192, 128)
    assert json.loads((out / "ramen_2.json").read_text())["tags"] == {"set": "product"}


def test_same_settings_give_identical_bytes_and_other_seeds_differ(tmp_path, demo_run):
    _, first = demo_run
    _, second = run(tmp_path, name="again")
    for stem in DEMO_FILES:
        assert (first / f"{stem}.png").read_bytes() == (second / f"{stem}.png").read_bytes(), stem
    _, other = run(tmp_path, "sampler.seed=100", "job.limit=1", name="other")
    assert (other / "cat_100.png").read_bytes() != (first / "cat_0.png").read_bytes()


def test_seed_policy_index_fixed_and_row_seed(tmp_path):
    cfg = run_config(["sampler.seed=10"])
    from pipeline.manifest import read_manifest

    rows = read_manifest(ROOT / "jobs/demo.jsonl").rows
    ident = run_identity(cfg, resolve_plan(cfg.quantization), "float32")
    seeds = [t.seed for t in expand(rows, cfg, ident)]
    assert seeds == [10, 42, 12, 13, 14, 14, 15]  # row index + 10; lighthouse has seed 42
    cfg_fixed = run_config(["sampler.seed=10", "sampler.seed_policy=fixed"])
    assert [t.seed for t in expand(rows, cfg_fixed, ident)] == [10, 42, 10, 10, 11, 10, 10]


def test_batches_group_equal_settings_and_respect_batch_size():
    cfg = run_config()
    from pipeline.manifest import read_manifest

    rows = read_manifest(ROOT / "jobs/demo.jsonl").rows
    tasks = list(expand(rows, cfg, run_identity(cfg, resolve_plan(cfg.quantization), "float32")))
    got = [[t.stem for t in b] for b in batches(tasks, 3)]
    assert got == [["cat_0", "lighthouse_42", "astronaut_3"], ["astronaut_4"], ["ramen_2"], ["robot-wide_4"], ["neon_5"]]


def test_rerun_skips_finished_images_and_redoes_changed_or_missing(tmp_path):
    _, out = run(tmp_path, "job.limit=3")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_*.png")}
    record, _ = run(tmp_path, "job.limit=3")
    assert record["counts"]["made"] == 0 and record["counts"]["skipped_existing"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_*.png")} == before
    assert record["previous_runs"][0]["status"] == "complete"
    (out / "ramen_2.json").unlink()  # an image without its sidecar counts as unfinished
    record, _ = run(tmp_path, "job.limit=3")
    assert record["counts"]["made"] == 1 and record["images"][0]["file"] == "ramen_2.png"
    # Other settings replace finished images only with job.overwrite=true (test_batch_safety.py: the refusal).
    record, _ = run(tmp_path, "job.limit=3", "sampler.steps=2", "job.overwrite=true")  # ramen sets its own steps: kept
    assert record["counts"]["made"] == 2 and record["counts"]["skipped_existing"] == 1
    record, _ = run(tmp_path, "job.limit=3", "sampler.guidance=2.0", "job.overwrite=true")  # other hash
    assert record["counts"]["made"] == 3
    record, _ = run(tmp_path, "job.limit=3", "sampler.guidance=2.0", "job.overwrite=true")  # same settings: kept
    assert record["counts"]["made"] == 0 and record["counts"]["skipped_existing"] == 3
    lines = (out / "index.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["file"] for line in lines) == ["cat_0.png", "lighthouse_42.png", "ramen_2.png"]


def test_finished_but_unindexed_images_are_indexed_on_resume(tmp_path):
    _, out = run(tmp_path, "job.limit=2")
    index = out / "index.jsonl"
    first = index.read_text().splitlines()[0]
    index.write_text(first + "\n" + '{"file": "cut off')  # as a crash mid-append would leave it
    run(tmp_path, "job.limit=2")
    files = []
    for line in index.read_text().splitlines():
        try:
            files.append(json.loads(line)["file"])
        except json.JSONDecodeError:
            pass
    assert sorted(files) == ["cat_0.png", "lighthouse_42.png"]


BAD = '{"id": "a", "prompt": "fine"}\n{"id": "b"}\n{"id": "c", "prompt": "x", "steps": 0}\n{"id": "d", "prompt": "ok too"}\n'


def test_on_error_abort_stops_before_building_the_model(tmp_path, write_manifest, monkeypatch):
    path = write_manifest("bad.jsonl", BAD)
    monkeypatch.setattr(runner, "load_models", lambda *a: pytest.fail("model built despite bad rows"))
    with pytest.raises(ManifestError) as e:
        run(tmp_path, f"job.manifest={path}")
    assert f"{path}:2: prompt: missing" in str(e.value)
    assert f"{path}:3: steps: must be in 1..1000, got 0" in str(e.value)
    assert "job.on_error=skip" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_on_error_skip_generates_the_rest_and_records_skipped_rows(tmp_path, write_manifest):
    path = write_manifest("bad.jsonl", BAD)
    record, out = run(tmp_path, f"job.manifest={path}", "job.on_error=skip")
    assert sorted(p.name for p in out.glob("*.png") if p.name != "grid.png") == ["a_0.png", "d_3.png"]
    assert record["counts"]["skipped_rows"] == 2
    assert [(s["line"], s["field"]) for s in record["skipped_rows"]] == [(2, "prompt"), (3, "steps")]
    assert all(s["file"] == str(path) and s["reason"] for s in record["skipped_rows"])


def test_failed_batch_is_recorded_with_reason_in_skip_mode_and_fatal_in_abort(tmp_path, monkeypatch):
    real = runner.generate_batch

    def flaky(pipe, family, batch, **kw):
        if any(t.row.id == "ramen" for t in batch):
            raise RuntimeError("simulated out of memory")
        return real(pipe, family, batch, **kw)

    monkeypatch.setattr(runner, "generate_batch", flaky)
    record, out = run(tmp_path, "job.on_error=skip", "job.limit=3")
    assert record["status"] == "incomplete" and record["counts"]["made"] == 2 and record["counts"]["failed"] == 1
    assert record["failed"] == [{"file": "ramen_2.png", "line": 3, "reason": "RuntimeError: simulated out of memory"}]
    with pytest.raises(RuntimeError, match="simulated"):
        run(tmp_path, "job.limit=3", name="abort")
    saved = json.loads((tmp_path / "abort" / "run.json").read_text())
    assert saved["status"] == "failed" and "simulated out of memory" in saved["error"]


def test_tiny_qwen_image_run(tmp_path):
    record, out = run(tmp_path, "model=tiny-qwen-image", "job.manifest=jobs/example.yaml", "sampler.steps=2")
    assert record["counts"]["made"] == 4
    side = json.loads((out / "tiny-house_3.json").read_text())
    assert side["model_family"] == "qwen-image" and side["true_cfg_scale"] == 4.0 and side["steps"] == 2
    assert Image.open(out / "tiny-house_3.png").size == (128, 128)


@pytest.mark.parametrize("manifest", ["jobs/example.csv", "jobs/example.tsv", "jobs/example.txt"])
def test_every_shipped_example_manifest_runs(tmp_path, manifest):
    record, _ = run(tmp_path, f"job.manifest={manifest}", "sampler.steps=1")
    assert record["status"] == "complete" and record["counts"]["made"] == record["counts"]["planned"] > 0


def test_scheduler_shift_override_changes_pixels(tmp_path):
    _, a = run(tmp_path, "job.limit=1", name="a")
    _, b = run(tmp_path, "job.limit=1", "sampler.scheduler.shift=5.0", "sampler.scheduler.use_dynamic_shifting=false", name="b")
    assert (a / "cat_0.png").read_bytes() != (b / "cat_0.png").read_bytes()
