"""LoRAs through the runner: per run (model.loras) and per manifest row, grouped into batches by LoRA set, the
same images as separate runs per set, resume across sets, the metadata, and the quantize job's bake_loras."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import run_config
from pipeline.errors import ConfigError, LoraError, ManifestError
from pipeline.runner import load_manifest, run_job

SMALL = ["sampler.steps=2", "sampler.height=64", "sampler.width=64", "sampler.max_sequence_length=32",
         "job.batch_size=4", "quantization=int4_r32", "quantization.calibration.num_prompts=2",
         "quantization.calibration.steps=2", "quantization.calibration.height=64", "quantization.calibration.width=64"]


def write_lora(path: Path, seed: int, rank: int = 4) -> Path:
    """A diffusers/PEFT-named LoRA for tiny-flux's first double block's attention and MLP (a strong one)."""
    from pipeline.models.tiny import build_tiny

    transformer = build_tiny(run_config(["model=tiny-flux"]).model).transformer
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0",
                 "transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_out"):
        layer = transformer.get_submodule(name)
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.3
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.3
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    one, two = write_lora(folder / "style.safetensors", 1), write_lora(folder / "product.safetensors", 2)
    rows = [{"id": "a", "prompt": "a red chair", "seed": 3, "loras": [{"path": "style.safetensors", "strength": 0.8}]},
            {"id": "b", "prompt": "a blue mug", "seed": 4},
            {"id": "c", "prompt": "a lighthouse", "seed": 5, "loras": "product.safetensors"},
            {"id": "d", "prompt": "a cat", "seed": 6, "loras": ["product.safetensors",
                                                              {"path": "style.safetensors", "strength": 0.8}]}]
    manifest = folder / "rows.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"folder": folder, "style": one, "product": two, "manifest": manifest}


def pixels(folder: Path, stem: str) -> np.ndarray:
    return np.asarray(Image.open(folder / f"{stem}.png"))


def one_row(files, tmp_path, row_id: str) -> Path:
    rows = [json.loads(line) for line in files["manifest"].read_text().splitlines()]
    path = tmp_path / f"{row_id}.jsonl"
    row = next(r for r in rows if r["id"] == row_id)
    row.pop("loras", None)
    path.write_text(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def mixed(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed")
    return run_job(run_config([f"job.manifest={files['manifest']}", *SMALL]), out), out


def test_rows_with_different_loras_make_the_images_separate_runs_per_set_make(files, mixed, tmp_path):
    record, out = mixed
    assert record["status"] == "complete" and record["counts"]["made"] == 4
    assert len(record["loras"]["files"]) == 2 and len(record["loras"]["sets"]) == 4
    style, product = (f"model.loras=[{{path: {files[n]}, strength: {s}}}]" for n, s in (("style", 0.8),
                                                                                           ("product", 1.0)))
    both = f"model.loras=[{{path: {files['product']}}}, {{path: {files['style']}, strength: 0.8}}]"
    for row_id, lora in (("a", style), ("b", None), ("c", product), ("d", both)):
        alone = tmp_path / f"alone-{row_id}"
        run_job(run_config([f"job.manifest={one_row(files, tmp_path, row_id)}", *SMALL, *([lora] if lora else [])]),
                alone)
        stem = f"{row_id}_{3 + 'abcd'.index(row_id)}"
        assert np.array_equal(pixels(out, stem), pixels(alone, stem)), row_id


def test_a_lora_changes_the_image_and_the_metadata_lists_it(files, mixed, tmp_path):
    _, out = mixed
    plain = tmp_path / "plain"
    run_job(run_config([f"job.manifest={one_row(files, tmp_path, 'a')}", *SMALL]), plain)
    assert not np.array_equal(pixels(out, "a_3"), pixels(plain, "a_3"))
    side = json.loads((out / "a_3.json").read_text())
    sha = side["loras"][0]["sha256"]
    assert side["loras"] == [{"name": "style", "path": "style.safetensors", "sha256": sha, "strength": 0.8}]
    text = Image.open(out / "a_3.png").text["parameters"]
    assert text.splitlines()[0] == "a red chair <lora:style:0.8>"
    assert f'Lora hashes: "style: {sha[:12]}"' in text
    assert "loras" not in json.loads((out / "b_4.json").read_text())


def test_resume_remakes_a_missing_image_of_any_lora_set_with_the_same_bytes(files, mixed, tmp_path):
    _, out = mixed
    again = tmp_path / "again"
    import shutil

    shutil.copytree(out, again)
    for stem in ("c_5", "d_6"):
        (again / f"{stem}.png").unlink()
        (again / f"{stem}.json").unlink()
    record = run_job(run_config([f"job.manifest={files['manifest']}", *SMALL]), again)
    assert record["counts"]["made"] == 2 and record["counts"]["skipped_existing"] == 2
    for stem in ("c_5", "d_6"):
        assert np.array_equal(pixels(again, stem), pixels(out, stem))


def test_a_changed_strength_is_a_changed_image(files, tmp_path):
    """The LoRA set is in the settings hash: another strength refuses to overwrite the image made with the first."""
    from pipeline.outputs.existing import WouldOverwrite

    out = tmp_path / "run"
    manifest = one_row(files, tmp_path, "b")
    run_job(run_config([f"job.manifest={manifest}", *SMALL, f"model.loras=[{{path: {files['style']}}}]"]), out)
    with pytest.raises(WouldOverwrite):
        run_job(run_config([f"job.manifest={manifest}", *SMALL,
                            f"model.loras=[{{path: {files['style']}, strength: 0.5}}]"]), out)


def test_missing_files_are_refused_before_anything_loads(files, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.loras\.0\.path: no such LoRA file: .*nope\.safetensors"):
        run_job(run_config([f"job.manifest={one_row(files, tmp_path, 'b')}", *SMALL,
                            "model.loras=[{path: nope.safetensors}]"]), tmp_path / "out")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a cat", "loras": "missing.safetensors:0.5"}) + "\n")
    with pytest.raises(ManifestError) as e:
        load_manifest(run_config([f"job.manifest={bad}"]))
    assert f"{bad}:1: loras: no such LoRA file: {tmp_path / 'missing.safetensors'}" in str(e.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


def test_a_lora_for_another_family_is_refused_naming_what_it_was_made_for(files, tmp_path):
    with pytest.raises(LoraError, match="flux"):
        run_job(run_config(["model=tiny-qwen-image", f"job.manifest={one_row(files, tmp_path, 'b')}", *SMALL,
                            f"model.loras=[{{path: {files['style']}}}]"]), tmp_path / "out")


def test_the_quantize_job_bakes_loras_only_when_asked(files, tmp_path):
    from hydra import compose, initialize_config_dir

    from pipeline.cli import CONF_DIR
    from pipeline.config import to_run_config
    from pipeline.quantize_job import quantize_model_to_file
    from pipeline.quantization.file_info import inspect_checkpoint

    lora = f"model.loras=[{{path: {files['style']}, strength: 0.8}}]"
    calibration = [o for o in SMALL if o.startswith("quantization.calibration")]

    def cfg(*extra):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return to_run_config(compose(config_name="quantize", overrides=["quantization=int4_r32", *calibration,
                                                                              *extra]))

    with pytest.raises(ConfigError, match="quantize.bake_loras=true"):
        quantize_model_to_file(cfg(lora), tmp_path / "no")
    report = quantize_model_to_file(cfg(lora, "quantize.bake_loras=true"), tmp_path / "baked")
    assert report["baked_loras"][0]["name"] == "style" and report["baked_loras"][0]["strength"] == 0.8
    info = inspect_checkpoint(report["file"])
    assert "svdq_batch" in info.metadata_keys
    plain = quantize_model_to_file(cfg(), tmp_path / "plain")
    from safetensors import safe_open

    with safe_open(report["file"], "pt") as a, safe_open(plain["file"], "pt") as b:
        assert set(a.keys()) == set(b.keys())  # the same layout: the LoRA is in the weights, not beside them
        meta = json.loads(a.metadata()["svdq_batch"])
    assert meta["baked_loras"][0]["sha256"] == report["baked_loras"][0]["sha256"]


def test_a_lora_on_a_model_loaded_from_an_svdq_file(files, mixed, tmp_path):
    """The common case: the 4-bit transformer comes from a file; the LoRA joins its low-rank branches. The file the
    quantize job writes reproduces the in-process quantization bit for bit, so a row gets the same image."""
    from hydra import compose, initialize_config_dir

    from pipeline.cli import CONF_DIR
    from pipeline.config import to_run_config
    from pipeline.quantize_job import quantize_model_to_file

    same = [o for o in SMALL if o.startswith(("quantization.calibration", "sampler."))]  # the run's calibration
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_run_config(compose(config_name="quantize", overrides=["quantization=int4_r32", *same]))
    path = quantize_model_to_file(cfg, tmp_path / "q")["file"]
    out = tmp_path / "from-file"
    small = [o for o in SMALL if not o.startswith("quantization")]
    record = run_job(run_config([f"job.manifest={files['manifest']}", *small, f"quantization.path={path}"]), out)
    assert record["quantization"]["summary"]["source"] == "file" and record["counts"]["made"] == 4
    _, mixed_out = mixed
    for stem in ("a_3", "b_4", "c_5", "d_6"):
        assert np.array_equal(pixels(out, stem), pixels(mixed_out, stem)), stem
