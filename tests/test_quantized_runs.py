"""Runs from a quantized file as users make them: a real-layout model folder without the 16-bit transformer
weights, every conflict refused with one message and exit status 2, memory placement settings on the CPU."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import run_cli, run_config
from pipeline.errors import ModelNotFoundError
from pipeline.models.tiny import build_tiny
from pipeline.runner import run_job
from pipeline.quantization.targets import targets_for

REAL = {"tiny-flux": "flux.1-dev", "tiny-qwen-image": "qwen-image"}
SMALL = ["sampler.steps=2", "sampler.height=128", "sampler.width=128", "sampler.max_sequence_length=128",
         "job.limit=1", "job.progress=none"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """tiny -> a diffusers folder saved from the tiny pipeline (the real layout), its transformer weights deleted."""
    made = {}

    def get(tiny: str):
        if tiny not in made:
            folder = tmp_path_factory.mktemp("models") / REAL[tiny]
            build_tiny(run_config([f"model={tiny}"]).model).save_pretrained(folder)
            for weights in (folder / "transformer").glob("*.safetensors"):
                weights.unlink()
            assert sorted(p.name for p in (folder / "transformer").iterdir()) == ["config.json"]
            made[tiny] = folder
        return made[tiny]

    return get


def pixels(folder):
    return np.asarray(Image.open(next(folder.glob("*.png"))))


@pytest.mark.parametrize("tiny", ["tiny-flux", "tiny-qwen-image"])
def test_a_real_layout_folder_without_transformer_weights_runs_from_the_file(saved, folders, tmp_path, tiny):
    """model.path is the 16-bit model without its transformer weights; the file fills the transformer, which is
    built from transformer/config.json: the same image as the tiny model with the same file."""
    _, path = saved(tiny, "int4", "legacy" if tiny == "tiny-flux" else "diffusers")
    real = run_job(run_config([f"model={REAL[tiny]}", f"model.path={folders(tiny)}", f"quantization.path={path}",
                               *SMALL]), tmp_path / "real")
    summary = real["quantization"]["summary"]
    assert real["counts"]["made"] == 1 and summary["source"] == "file" and summary["backend"] == "reference"
    assert summary["layers_swapped"] == len(targets_for(build_tiny(run_config([f"model={tiny}"]).model).transformer))
    assert summary["bytes_after"] < summary["bytes_before"]  # the 16-bit size, computed on the meta device
    assert real["placement"]["device"] == "cpu" and real["placement"]["offload"] == "none"
    from_tiny = run_job(run_config([f"model={tiny}", f"quantization.path={path}", *SMALL]), tmp_path / "tiny")
    assert from_tiny["counts"]["made"] == 1
    assert np.array_equal(pixels(tmp_path / "real"), pixels(tmp_path / "tiny"))


def test_a_folder_without_transformer_config_takes_the_files_config(saved, folders, tmp_path):
    """The base repo without its transformer folder at all is enough: the file's `config` metadata builds it."""
    _, path = saved("tiny-flux", "int4", "legacy")
    folder = tmp_path / "FLUX.1-dev"
    shutil.copytree(folders("tiny-flux"), folder)
    shutil.rmtree(folder / "transformer")
    record = run_job(run_config(["model=flux.1-dev", f"model.path={folder}", f"quantization.path={path}", *SMALL]),
                     tmp_path / "out")
    assert record["counts"]["made"] == 1 and record["quantization"]["summary"]["source"] == "file"


def test_no_config_anywhere_is_named(folders, tmp_path):
    from pipeline.models.quantized import transformer_config
    from pipeline.quantization.file_info import CheckpointInfo

    folder = tmp_path / "FLUX.1-dev"
    shutil.copytree(folders("tiny-flux"), folder)
    (folder / "transformer/config.json").unlink()
    info = CheckpointInfo("/f/svdq-int4_r32-x.safetensors", "int4", 32, "legacy", "flux", None, None)
    with pytest.raises(ModelNotFoundError) as e:
        transformer_config(run_config(["model=flux.1-dev", f"model.path={folder}"]).model, info)
    assert f"{folder}/transformer/config.json: no such file" in str(e.value)
    assert "/f/svdq-int4_r32-x.safetensors carries no 'config' metadata" in str(e.value)


def _with_header(src, dst, **changes):
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(src)), str(dst), metadata={**meta, **changes})
    return dst


def _without(src, dst, key):
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    tensors.pop(key)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def conflicts(saved, folders, tmp):
    """(overrides, what stderr must say) for each kind of file that must be refused."""
    _, flux = saved("tiny-flux", "int4", "legacy")
    _, qwen = saved("tiny-qwen-image", "int4")
    misnamed = tmp / "svdq-int4_r128-tiny-flux.safetensors"
    shutil.copy(flux, misnamed)
    qc = json.loads(safe_open(str(flux), "pt").metadata()["quantization_config"])
    header = _with_header(flux, tmp / "svdq-int4_r32-header.safetensors",
                          quantization_config=json.dumps(dict(qc, rank=128)))
    cut = _without(flux, tmp / "svdq-int4_r32-cut.safetensors", "single_transformer_blocks.1.mlp_fc2.lora_up")
    return {
        "name vs tensors": ([f"quantization.path={misnamed}"],
                            "the file name says rank=128 but the tensors are rank=32"),
        "metadata vs tensors": ([f"quantization.path={header}"],
                                "metadata quantization_config says rank=128 but the tensors are rank=32"),
        "setting vs file": ([f"quantization.path={flux}", "quantization.precision=nvfp4"],
                            "quantization.precision=nvfp4 is set but the file's tensors are precision=int4"),
        "another family": ([f"quantization.path={qwen}"],
                           "holds a qwen-image transformer (by its tensor names) but model=tiny-flux is a flux model"),
        "another transformer": ([f"quantization.path={flux}", "model.tiny.num_layers=3"],
                                "was made for another transformer than tiny-flux's (the built-in tiny-flux): "
                                "num_layers: file 2, model 3"),
        "missing tensor": ([f"quantization.path={cut}"],
                           "missing tensor 'single_transformer_blocks.1.mlp_fc2.lora_up' (layer "
                           "single_transformer_blocks.1.mlp_fc2: 128x512, rank 32, int4)"),
        "no 16-bit weights to compare with": ([f"quantization.path={flux}", "model=flux.1-dev",
                                               f"model.path={folders('tiny-flux')}", "job.compare_to_unquantized=true"],
                                              "holds no transformer weights"),
    }


CASES = ["name vs tensors", "metadata vs tensors", "setting vs file", "another family", "another transformer",
         "missing tensor", "no 16-bit weights to compare with"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_every_conflict_exits_2_with_its_message_and_makes_nothing(saved, folders, tmp_path, case):
    overrides, message = conflicts(saved, folders, tmp_path)[case]
    out = tmp_path / "out"
    r = run_cli([*overrides, f"hydra.run.dir={out}", "job.progress=none"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("overrides,ignored", [
    (["model.offload=model"], ["model.offload=model"]),
    (["model.offload=sequential"], ["model.offload=sequential"]),
    (["model.offload=none", "model.blocks_on_gpu=1", "model.pin_memory=true"],
     ["model.blocks_on_gpu=1", "model.pin_memory=true"]),
    (["model.text_encoder_device=cpu", "model.vae_tiling=true"], []),
])
def test_placement_settings_compose_and_on_the_cpu_change_nothing(saved, tmp_path, caplog, overrides, ignored):
    """Every placement setting is accepted with a quantized file; on the CPU offload is a no-op said once, the
    run records it, and the image is the default run's."""
    _, path = saved("tiny-flux", "int4", "legacy")
    base = run_job(run_config([f"quantization.path={path}", *SMALL]), tmp_path / "base")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        record = run_job(run_config([f"quantization.path={path}", *SMALL, *overrides]), tmp_path / "placed")
    placement = record["placement"]
    assert record["counts"]["made"] == base["counts"]["made"] == 1
    assert (placement["offload"], placement["blocks_on_gpu"], placement["device"]) == ("none", None, "cpu")
    assert placement["ignored"] == ignored
    said = [r.message for r in caplog.records if "has no effect" in r.message]
    assert len(said) == (1 if ignored else 0)
    assert np.array_equal(pixels(tmp_path / "placed"), pixels(tmp_path / "base"))


def test_compare_renders_the_reference_with_only_one_transformer_placed(saved, tmp_path):
    _, path = saved("tiny-qwen-image", "int4")
    record = run_job(run_config(["model=tiny-qwen-image", f"quantization.path={path}", *SMALL,
                                 "job.compare_to_unquantized=true"]), tmp_path / "out")
    assert record["quality"]["images"] == 1 and 5 < record["quality"]["psnr_vs_unquantized_mean"] < 200
    assert record["reference_placement"]["reason"] == "the run device is the CPU: the transformers only swap places"
