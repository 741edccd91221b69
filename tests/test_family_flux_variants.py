"""FLUX.1 Kontext (one input image) and Fill (image + mask): the flux architecture with their own pipelines.

Tiny runs through the real runner (16-bit, quantized in-process, from a quantize-job file), the quantize job, a
file's round trip, the full-size file layout on the meta device against the tensor list derived from Nunchaku's
loader and DeepCompressor's writer (tests/data/nunchaku_tensors: FLUX.1-dev's; Kontext's transformer is the same,
Fill's differs in x_embedder only), and the refusal of a Fill file on a Kontext model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import run_config
from family_runs import input_pictures, pixels, quantize_job_maker, run_maker, write_manifests
from pipeline.errors import ManifestError, QuantizationError
from pipeline.runner import load_manifest, run_job

MODELS = {"kontext": "tiny-flux-kontext", "fill": "tiny-flux-fill"}
REAL = {"kontext": "flux.1-kontext-dev", "fill": "flux.1-fill-dev"}
SMALL = ["sampler.steps=2", "sampler.height=64", "sampler.width=64", "sampler.max_sequence_length=32",
         "job.progress=none", "job.on_error=skip"]
CALIBRATION = ["quantization.calibration.num_prompts=2", "quantization.calibration.steps=2",
               "quantization.calibration.height=64", "quantization.calibration.width=64",
               "quantization.calibration.batch_size=2", "quantization.calibration.alphas=[0.5]",  # one SVD a layer
               "sampler.max_sequence_length=32"]
CONFIGS = Path(__file__).resolve().parents[1] / "pipeline/models/configs"


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    """variant -> a JSONL manifest: rows a and b (same prompt and seed, different input images) and a third row
    missing what the model needs (Kontext: the image; Fill: the mask)."""
    folder = tmp_path_factory.mktemp("inputs")
    input_pictures(folder)
    y, x = np.mgrid[0:48, 0:64]
    Image.fromarray(((x > 20) & (x < 44) & (y > 10) & (y < 38)).astype(np.uint8) * 255).save(folder / "mask.png")
    common = {"prompt": "make it blue", "seed": 7}
    rows = {"kontext": [dict(common, id="a", image="a.png"), dict(common, id="b", image="b.png"),
                        dict(common, id="c")],
            "fill": [dict(common, id="a", image="a.png", mask="mask.png"),
                     dict(common, id="b", image="b.png", mask="mask.png"), dict(common, id="c", image="a.png")]}
    return write_manifests(folder, rows)


@pytest.fixture(scope="module")
def quantize_job(tmp_path_factory):
    return quantize_job_maker(tmp_path_factory, MODELS, CALIBRATION)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, manifests, quantize_job):
    return run_maker(tmp_path_factory, MODELS, manifests, quantize_job, SMALL, CALIBRATION)


@pytest.mark.parametrize("kind", ["none", "int4"])
@pytest.mark.parametrize("variant", ["kontext", "fill"])
def test_a_tiny_run_makes_each_row_from_its_own_inputs(runs, manifests, variant, kind):
    record, out = runs(variant, kind)
    assert record["status"] == "complete" and record["counts"]["made"] == 2 and record["counts"]["skipped_rows"] == 1
    missing = "image" if variant == "kontext" else "mask"
    assert [(r["line"], r["field"]) for r in record["skipped_rows"]] == [(3, missing)]
    assert record["skipped_rows"][0]["reason"].startswith("missing: ")
    folder = manifests[variant].parent
    for stem, image in (("a_7", "a.png"), ("b_7", "b.png")):
        assert Image.open(out / f"{stem}.png").size == (64, 64)  # the task's size, whatever the input's (64x48)
        sidecar = json.loads((out / f"{stem}.json").read_text())
        expected = [("image", image)] + ([("mask", "mask.png")] if variant == "fill" else [])
        assert [(i["role"], i["path"]) for i in sidecar["inputs"]] == expected
        for i in sidecar["inputs"]:
            assert i["sha256"] == hashlib.sha256((folder / i["path"]).read_bytes()).hexdigest()
            assert (i["width"], i["height"]) == (64, 48)
    a, b = pixels(out, "a_7"), pixels(out, "b_7")  # same prompt, same seed: only the input image differs
    assert not np.array_equal(a, b)
    summary = record["quantization"]["summary"]
    if kind == "int4":
        from pipeline.models.tiny import build_tiny
        from pipeline.quantization.targets import targets_for

        expected_layers = len(targets_for(build_tiny(run_config([f"model={MODELS[variant]}"]).model).transformer))
        assert summary["source"] == "calibrated" and summary["layers_swapped"] == expected_layers == 30
        assert not np.array_equal(a, pixels(runs(variant, "none")[1], "a_7"))  # 4-bit: not the 16-bit image


@pytest.mark.parametrize("variant", ["kontext", "fill"])
def test_quantize_save_reload_gives_the_in_process_images(runs, quantize_job, variant):
    """The quantize job's file, run: the very pixels of the run that quantized in-process with the same
    calibration (quantize -> save -> load is lossless)."""
    path, report = quantize_job(variant)
    assert path.name == f"svdq-int4_r32-{MODELS[variant]}.safetensors" and report["naming"] == "legacy"
    record, out = runs(variant, "file")
    assert record["counts"]["made"] == 2 and record["quantization"]["summary"]["source"] == "file"
    in_process = runs(variant, "int4")[1]
    for stem in ("a_7", "b_7"):
        assert np.array_equal(pixels(out, stem), pixels(in_process, stem)), stem


@pytest.mark.parametrize("variant", ["kontext", "fill"])
def test_a_file_round_trips_bit_for_bit_and_inspect_names_its_model(quantize_job, tmp_path, variant):
    from pipeline.inspect import describe
    from pipeline.models.tiny import build_tiny
    from pipeline.quantization import load_quantized_
    from pipeline.quantization.checkpoint import file_layout, save_checkpoint

    path, _ = quantize_job(variant)
    fresh = build_tiny(run_config([f"model={MODELS[variant]}"]).model).transformer
    layout = file_layout(fresh, precision="int4", rank=32, naming="legacy")  # from the 16-bit module shapes
    info, names = load_quantized_(fresh, path)
    assert (info.family, info.naming, len(names)) == ("flux", "legacy", 30)
    again = save_checkpoint(fresh, tmp_path / path.name, precision="int4", rank=32, act_unsigned=True,
                            model_name=MODELS[variant], naming="legacy")
    with safe_open(str(path), "pt") as a, safe_open(str(again), "pt") as b:
        assert a.keys() == b.keys()
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), k
        written = {k: (tuple(a.get_slice(k).get_shape()), a.get_tensor(k).dtype) for k in a.keys()}
        config = json.loads(a.metadata()["config"])
    assert layout == written
    assert written["x_embedder.weight"][0] == (128, 384 if variant == "fill" else 64)
    assert (config["in_channels"], config.get("out_channels")) == ((384, 64) if variant == "fill" else (64, None))
    r = describe(path)
    assert (r["fits"], r["fits_by"], r["problems"], r["family"]) == ([MODELS[variant]], "config", [], "flux")


@pytest.mark.parametrize("variant", ["kontext", "fill"])
def test_a_row_without_its_input_is_a_row_error(manifests, variant):
    cfg = run_config([f"model={MODELS[variant]}", f"job.manifest={manifests[variant]}"])
    with pytest.raises(ManifestError) as e:
        load_manifest(cfg)  # job.on_error=abort (the default): nothing is generated
    message = str(e.value)
    if variant == "kontext":
        assert f"{manifests[variant]}:3: image: missing: this model edits an input image" in message
    else:
        assert f"{manifests[variant]}:3: mask: missing: this inpainting model needs a mask" in message


def test_kontext_generates_at_the_task_size_and_never_auto_resizes_the_input(manifests):
    """diffusers' defaults would rescale the output to 1024*1024 and snap the input to a ~1 MP preferred Kontext
    resolution; the family passes the task's area and the input at its own aspect ratio at that area."""
    from pipeline.families.flux_kontext import conditioning_image, kontext_kwargs
    from pipeline.tasks import expand

    cfg = run_config(["model=tiny-flux-kontext", f"job.manifest={manifests['kontext']}", *SMALL])
    task = next(expand(load_manifest(cfg).rows, cfg, {}))
    kw = kontext_kwargs(None, [task])
    assert (kw["max_area"], kw["_auto_resize"], kw["guidance_scale"]) == (64 * 64, False, 2.5)
    assert kw["image"].size == (80, 48)  # 64x48 at 64*64 px: 73.9 x 55.4, to multiples of 16
    assert conditioning_image(Image.new("RGB", (1200, 800)), 1024, 1024).size == (1248, 832)  # a preferred one
    assert conditioning_image(Image.new("RGB", (3000, 3000)), 512, 512).size == (512, 512)


def test_fill_has_no_true_cfg_so_asking_for_it_is_refused_before_generating(manifests):
    """FluxFillPipeline takes neither true_cfg_scale nor a negative prompt: 1 is left out of the call; more is
    refused with the manifest (the sampler's value: a config error; a row's: a row error), before any model loads
    (Kontext's pipeline has true CFG, as FLUX.1-dev's)."""
    from diffusers import FluxFillPipeline, FluxKontextPipeline

    from pipeline.errors import ConfigError
    from pipeline.quantization.diffusers_compat import takes_argument

    cfg = run_config(["model=tiny-flux-fill", f"job.manifest={manifests['fill']}", *SMALL, "sampler.true_cfg_scale=4"])
    with pytest.raises(ConfigError, match="sampler.true_cfg_scale: tiny-flux-fill has no true classifier-free .*got 4.0"):
        load_manifest(cfg)
    rows = manifests["fill"].read_text().splitlines()
    asking = manifests["fill"].with_name("fill-cfg.jsonl")
    asking.write_text("\n".join([rows[0], json.dumps(dict(json.loads(rows[1]), true_cfg_scale=4.0))]) + "\n")
    cfg = run_config(["model=tiny-flux-fill", f"job.manifest={asking}", *SMALL, "job.on_error=skip"])
    manifest = load_manifest(cfg)
    assert [r.id for r in manifest.rows] == ["a"]
    assert [str(p) for p in manifest.problems] == [
        f"{asking}:2: true_cfg_scale: tiny-flux-fill has no true classifier-free guidance; use 1 (or leave it "
        "out), got 4.0"]
    assert not takes_argument(FluxFillPipeline.__new__(FluxFillPipeline), "true_cfg_scale") and takes_argument(
        FluxKontextPipeline.__new__(FluxKontextPipeline), "true_cfg_scale")


@pytest.mark.parametrize("variant,steps,guidance", [("kontext", 28, 2.5), ("fill", 50, 30.0)])
def test_real_models_and_sampler_presets(variant, steps, guidance):
    real = run_config([f"model={REAL[variant]}"])
    rec = real.model.recommended
    assert (real.model.family, rec.steps, rec.guidance, rec.height, rec.max_sequence_length) == (
        f"flux-{variant}", steps, guidance, 1024, 512)
    preset = run_config([f"model={MODELS[variant]}", f"sampler={variant}"]).sampler
    assert (preset.name, preset.steps, preset.guidance, preset.true_cfg_scale) == (variant, steps, guidance, 1.0)
    assert run_config([f"model={MODELS[variant]}"]).model.tiny.guidance_embeds  # as the real ones


# --- full size, on the meta device -------------------------------------------------------------------------------


def full_size(variant: str):
    from pipeline.models.quantized import meta_transformer

    return meta_transformer(f"flux-{variant}", json.loads((CONFIGS / f"{REAL[variant]}.json").read_text()),
                            torch.bfloat16)


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
@pytest.mark.parametrize("variant", ["kontext", "fill"])
def test_full_size_layout_is_flux_dev_s_with_fill_s_wider_input(variant, precision):
    """Nunchaku's svdq-{int4,fp4}_r32-flux.1-{kontext,fill}-dev files: FLUX.1-dev's tensors (legacy names), Fill's
    x_embedder taking 384 channels (Nunchaku builds the transformer from the file's config metadata)."""
    from test_nunchaku_files import nunchaku_list

    from pipeline.quantization.checkpoint import file_layout

    ours = {k: (list(shape), str(dtype)) for k, (shape, dtype) in
            file_layout(full_size(variant), precision=precision, rank=32, naming="legacy").items()}
    theirs = nunchaku_list("flux.1-dev", precision, 32)
    if variant == "fill":
        assert theirs["x_embedder.weight"] == ([3072, 64], "torch.bfloat16")
        theirs["x_embedder.weight"] = ([3072, 384], "torch.bfloat16")
        assert ours["proj_out.weight"] == ([64, 3072], "torch.bfloat16")  # out_channels 64
    assert ours == theirs


def test_a_fill_file_on_a_kontext_model_is_refused(quantize_job, tmp_path):
    """Before anything is loaded: the tiny models' files by the run, the full-size configs by check_file_fits."""
    from pipeline.inspect import fitting_models
    from pipeline.models.quantized import check_file_fits
    from pipeline.quantization.file_info import CheckpointInfo

    fill, _ = quantize_job("fill")
    with pytest.raises(QuantizationError) as e:
        run_job(run_config(["model=tiny-flux-kontext", f"quantization.path={fill}", *SMALL]), tmp_path / "out")
    assert "was made for another transformer than tiny-flux-kontext's (the built-in tiny-flux-kontext): " \
           "in_channels: file 384, model 64. Use the svdq-* file made for this model" in str(e.value)
    assert not list((tmp_path / "out").glob("*.png"))

    configs = {v: json.loads((CONFIGS / f"{REAL[v]}.json").read_text()) for v in REAL}
    folder = tmp_path / "FLUX.1-Kontext-dev"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "transformer/config.json").write_text(json.dumps(configs["kontext"]))
    info = CheckpointInfo(f"{tmp_path}/svdq-int4_r32-flux.1-fill-dev.safetensors", "int4", 32, "legacy", "flux",
                          "NunchakuFluxTransformer2dModel", True, config=configs["fill"])
    with pytest.raises(QuantizationError, match=r"made for another transformer than flux\.1-kontext-dev's .*"
                                                r"in_channels: file 384, model 64"):
        check_file_fits(run_config(["model=flux.1-kontext-dev", f"model.path={folder}"]).model, info)
    assert fitting_models(info)[0] == ["flux.1-fill-dev"]
    kontext = CheckpointInfo(f"{tmp_path}/svdq-fp4_r32-flux.1-kontext-dev.safetensors", "nvfp4", 32, "legacy",
                             "flux", "NunchakuFluxTransformer2dModel", False, config=configs["kontext"])
    check_file_fits(run_config(["model=flux.1-kontext-dev", f"model.path={folder}"]).model, kontext)  # fits
    assert fitting_models(kontext)[0] == ["flux.1-kontext-dev"]  # FLUX.1-dev's shape too: the name decides


def test_the_quality_report_shows_each_input_beside_the_reference_and_the_variants(runs):
    """An edit run's report: every prompt shows its input image first (thumbnail linking to the file)."""
    from pipeline.report import build_report

    _, reference = runs("kontext", "none")
    _, quantized = runs("kontext", "int4")
    html = build_report(quantized, reference=str(reference)).read_text()
    assert html.count("alt='input image'") == 2  # rows a and b, one input each
    inputs = sorted((quantized / "report" / "thumbs" / "_inputs").glob("*.png"))
    assert len(inputs) == 2 and all(f"thumbs/_inputs/{p.name}" in html for p in inputs)
    assert "a.png" in html and "b.png" in html


def test_the_memory_estimate_counts_the_input_tokens_kontext_adds(manifests):
    """A Kontext step sees the output's tokens and as many again from the input (resized to the output's area);
    Fill's inputs are channels, not tokens."""
    from pipeline.generate import largest_call
    from pipeline.models.memory import ModelDims, activation_bytes
    from pipeline.tasks import expand

    for variant, extra in (("kontext", 16), ("fill", 0)):  # 64x64 output: 4 x 4 tokens
        cfg = run_config([f"model={MODELS[variant]}", f"job.manifest={manifests[variant]}", *SMALL,
                          "job.on_error=skip"])
        tasks = list(expand(load_manifest(cfg).rows, cfg, {}))
        work = largest_call(tasks, 4, 2, cfg.model.family)
        assert (work.batch_size, work.extra_tokens) == (2, extra)
        dims = ModelDims(64, (64,), 8, None)
        plain = activation_bytes(dims, largest_call(tasks, 4, 2), False)[1]
        assert activation_bytes(dims, work, False)[1] == plain * (16 + 32 + extra) // (16 + 32)
