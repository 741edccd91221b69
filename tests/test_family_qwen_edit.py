"""Qwen-Image-Edit (one input image) and Edit-2509 (QwenImageEditPlusPipeline, 1 to 3 images): the qwen-image
architecture with their own pipelines.

Tiny runs through the real runner (16-bit, quantized in-process, from a quantize-job file), a file's round trip and
`inspect`, the full-size file layout on the meta device against the tensor list derived from Nunchaku's Qwen-Image
loader (tests/data/nunchaku_tensors: Qwen-Image's; the edit transformers are the same), a real-layout folder loaded
without torchvision, the prompt count of the edit templates, row errors, and tiny-qwen-image left as it was.
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
from pipeline.errors import ManifestError
from pipeline.runner import load_manifest

MODELS = {"edit": "tiny-qwen-image-edit", "plus": "tiny-qwen-image-edit-2509"}
REAL = {"edit": "qwen-image-edit", "plus": "qwen-image-edit-2509"}
FAMILIES = {"edit": "qwen-image-edit", "plus": "qwen-image-edit-plus"}
# 80x64: not the input's 64x48, and not a multiple of 32 wide (the pipelines keep multiples of 16)
SMALL = ["sampler.steps=2", "sampler.height=64", "sampler.width=80", "sampler.max_sequence_length=32",
         "job.progress=none", "job.on_error=skip", "job.batch_size=2"]
CALIBRATION = ["quantization.calibration.num_prompts=2", "quantization.calibration.steps=2",
               "quantization.calibration.height=64", "quantization.calibration.width=64",
               "quantization.calibration.batch_size=2", "quantization.calibration.alphas=[0.5]",
               "sampler.max_sequence_length=32"]
CONFIGS = Path(__file__).resolve().parents[1] / "pipeline/models/configs"


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    """variant -> a JSONL manifest: rows a and b (same prompt and seed, different first input image), a row c
    without an image, and for Edit-2509 a row d with four images; Edit-2509's rows a and b hold two images, and
    row a makes two images (one batch of job.batch_size=2, made in two calls)."""
    folder = tmp_path_factory.mktemp("inputs")
    a = input_pictures(folder)
    Image.fromarray(np.roll(a, 20, axis=1)[:, :, ::-1].copy()).save(folder / "c.png")
    common = {"prompt": "make it blue", "seed": 7}
    rows = {"edit": [dict(common, id="a", image="a.png"), dict(common, id="b", image="b.png"), dict(common, id="c")],
            "plus": [dict(common, id="a", image=["a.png", "c.png"], num_images=2),
                     dict(common, id="b", image=["b.png", "c.png"]), dict(common, id="c"),
                     dict(common, id="d", image=["a.png", "b.png", "c.png", "a.png"])]}
    return write_manifests(folder, rows)


@pytest.fixture(scope="module")
def quantize_job(tmp_path_factory):
    return quantize_job_maker(tmp_path_factory, MODELS, CALIBRATION)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, manifests, quantize_job):
    return run_maker(tmp_path_factory, MODELS, manifests, quantize_job, SMALL, CALIBRATION)


INPUTS = {"edit": {"a_7": ["a.png"], "b_7": ["b.png"]},
          "plus": {"a_7": ["a.png", "c.png"], "a_8": ["a.png", "c.png"], "b_7": ["b.png", "c.png"]}}


@pytest.mark.parametrize("kind", ["none", "int4"])
@pytest.mark.parametrize("variant", ["edit", "plus"])
def test_a_tiny_run_makes_each_row_from_its_own_inputs(runs, manifests, variant, kind):
    record, out = runs(variant, kind)
    made = INPUTS[variant]
    assert record["status"] == "complete" and record["counts"]["made"] == len(made)
    bad = [(r["line"], r["field"]) for r in record["skipped_rows"]]
    assert bad == ([(3, "image")] if variant == "edit" else [(3, "image"), (4, "image")])
    folder = manifests[variant].parent
    for stem, images in made.items():
        assert Image.open(out / f"{stem}.png").size == (80, 64)  # the task's size, whatever the inputs' (64x48)
        sidecar = json.loads((out / f"{stem}.json").read_text())
        assert sidecar["model_family"] == FAMILIES[variant] and sidecar["true_cfg_scale"] == 4.0
        assert [(i["role"], i["path"]) for i in sidecar["inputs"]] == [("image", name) for name in images]
        for i in sidecar["inputs"]:
            assert i["sha256"] == hashlib.sha256((folder / i["path"]).read_bytes()).hexdigest()
            assert (i["width"], i["height"]) == (64, 48)
    a, b = pixels(out, "a_7"), pixels(out, "b_7")  # same prompt, same seed: only the (first) input image differs
    assert not np.array_equal(a, b)
    if variant == "plus":  # one batch of two images, made in two calls (the pipeline takes one prompt a call)
        assert not np.array_equal(a, pixels(out, "a_8"))
    summary = record["quantization"]["summary"]
    if kind == "int4":
        assert summary["source"] == "calibrated" and summary["layers_swapped"] == 2 * 10  # 8 W4A4 + 2 AWQ a block
        assert not np.array_equal(a, pixels(runs(variant, "none")[1], "a_7"))  # 4-bit: not the 16-bit image


@pytest.mark.parametrize("variant", ["edit", "plus"])
def test_quantize_save_reload_gives_the_in_process_images_and_the_same_bytes(runs, quantize_job, tmp_path,
                                                                              variant):
    """The quantize job's file, run: the very pixels of the run that quantized in-process with the same calibration;
    loaded into a fresh tiny transformer and saved again: the same bytes; `inspect` names its model."""
    from test_checkpoint import forward

    from pipeline.inspect import describe
    from pipeline.models.tiny import build_tiny
    from pipeline.quantization import load_quantized_
    from pipeline.quantization.checkpoint import file_layout, save_checkpoint

    path, report = quantize_job(variant)
    assert path.name == f"svdq-int4_r32-{MODELS[variant]}.safetensors" and report["naming"] == "diffusers"
    record, out = runs(variant, "file")
    assert record["counts"]["made"] == len(INPUTS[variant]) and record["quantization"]["summary"]["source"] == "file"
    for stem in INPUTS[variant]:
        assert np.array_equal(pixels(out, stem), pixels(runs(variant, "int4")[1], stem)), stem

    fresh = build_tiny(run_config([f"model={MODELS[variant]}"]).model).transformer
    sixteen, layout = forward(fresh, "tiny-qwen-image"), file_layout(fresh, precision="int4", rank=32)
    info, names = load_quantized_(fresh, path)
    assert (info.family, info.naming, len(names)) == ("qwen-image", "diffusers", 20)
    assert not torch.equal(forward(fresh, "tiny-qwen-image"), sixteen)
    again = save_checkpoint(fresh, tmp_path / path.name, precision="int4", rank=32, act_unsigned=True,
                            model_name=MODELS[variant], naming="diffusers")
    with safe_open(str(path), "pt") as a, safe_open(str(again), "pt") as b:
        assert a.keys() == b.keys()
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), k
        written = {k: (tuple(a.get_slice(k).get_shape()), a.get_tensor(k).dtype) for k in a.keys()}
    assert layout == written
    r = describe(path)  # tiny-qwen-image and both tiny edit models have this shape: the file name decides
    assert (r["fits"], r["fits_by"], r["problems"], r["family"]) == ([MODELS[variant]], "config", [], "qwen-image")


@pytest.mark.parametrize("variant", ["edit", "plus"])
def test_a_row_without_an_image_or_with_too_many_is_a_row_error(manifests, write_manifest, variant):
    cfg = run_config([f"model={MODELS[variant]}", f"job.manifest={manifests[variant]}"])
    with pytest.raises(ManifestError) as e:
        load_manifest(cfg)  # job.on_error=abort (the default): nothing is generated
    message, where = str(e.value), manifests[variant]
    if variant == "edit":
        assert f"{where}:3: image: missing: this model edits an input image" in message
        two = write_manifest("two.jsonl", json.dumps({"prompt": "x", "image": ["a.png", "b.png"]}) + "\n")
        with pytest.raises(ManifestError, match="this model takes one input image, got 2"):
            load_manifest(run_config([f"model={MODELS[variant]}", f"job.manifest={two}"]))
    else:
        assert f"{where}:3: image: missing: this model edits 1 to 3 input images" in message
        assert f"{where}:4: image: this model takes at most 3 input images, got 4" in message


def test_the_families_share_qwen_image_s_architecture_and_say_their_inputs():
    from pipeline.families import family, inputs_of
    from pipeline.inputs import MAX_INPUT_IMAGES
    from pipeline.quantization.architecture import architecture

    edit, plus, t2i = family("qwen-image-edit"), family("qwen-image-edit-plus"), family("qwen-image")
    assert edit.architecture is plus.architecture is t2i.architecture is architecture("qwen-image")
    assert (inputs_of(edit.name), inputs_of(plus.name)) == ("image", "images")
    assert (edit.pipeline_class, plus.pipeline_class) == ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
    assert plus.max_images == MAX_INPUT_IMAGES["images"] == 3 and edit.max_batch == plus.max_batch == 1
    for name in ("qwen-image-edit", "qwen-image-edit-2509"):
        cfg = run_config([f"model={name}"])
        rec = cfg.model.recommended
        assert (rec.true_cfg_scale, rec.height, rec.width, rec.max_sequence_length, rec.min_steps) == \
            (4.0, 1024, 1024, 512, 2)
    assert run_config(["model=qwen-image-edit"]).model.recommended.steps == 50
    assert run_config(["model=qwen-image-edit-2509"]).model.recommended.steps == 40
    s = run_config(["sampler=edit"]).sampler
    assert (s.steps, s.true_cfg_scale) == (50, 4.0)


@pytest.fixture(scope="module")
def tiny_pipes():
    from pipeline.models.tiny import build_tiny

    made = {}

    def get(variant):
        if variant not in made:
            made[variant] = build_tiny(run_config([f"model={MODELS[variant]}"]).model)
            made[variant].set_progress_bar_config(disable=True)
        return made[variant]

    return get


def test_the_edit_prompt_is_never_cut_and_its_count_is_what_the_encoder_reads(tiny_pipes):
    """diffusers' edit pipelines encode the whole prompt (Qwen-Image's cuts it at max_sequence_length): no row is
    reported as cut; the count is the text after the template's system part, which is what the pipeline keeps, the
    image's one <|image_pad|> standing for the vision tokens the processor puts there."""
    from pipeline.families.qwen_image.tiny import TINY_EDIT_AREA, build_tiny_qwen_image
    from pipeline.models.prompt_limits import dropped_tokens, token_counts

    pipe = tiny_pipes("edit")
    prompt = " ".join(["a watercolor painting of a lighthouse on a rocky coast at dawn"] * 8)
    (cut,) = token_counts(pipe, "qwen-image-edit", prompt, 32)
    assert cut.tokens > 100 and cut.dropped == 0 and dropped_tokens(pipe, "qwen-image-edit", prompt, 32) == {}
    image = Image.new("RGB", (64, 48), (10, 200, 30)).resize((128, 128))  # the pipeline's resize at TINY_EDIT_AREA
    assert 128 * 128 == TINY_EDIT_AREA
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt, image=image, device=torch.device("cpu"), max_sequence_length=32)
    grid = pipe.processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    vision = int(grid.prod()) // pipe.processor.image_processor.merge_size ** 2
    assert embeds.shape[1] == cut.tokens - 1 + vision  # all of it: nothing cut at 32
    t2i = build_tiny_qwen_image(run_config(["model=tiny-qwen-image"]).model.tiny)
    assert dropped_tokens(t2i, "qwen-image", prompt, 32)["qwen"] > 0  # the text-to-image pipeline cuts it


def test_the_pipelines_honour_the_task_size_and_encode_the_input_at_the_tiny_area(tiny_pipes):
    """height and width are passed through as given (multiples of 16); the input goes to the VAE at its aspect
    ratio at TINY_EDIT_AREA (diffusers: 1024*1024) whatever the output size, in calls of one image."""
    from pipeline.families.qwen_image_edit import edit_calibration_kwargs, edit_plus_calibration_kwargs

    pipe = tiny_pipes("plus")
    seen = []
    handle = pipe.vae.encoder.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    try:
        with torch.no_grad():
            out = pipe(image=[Image.new("RGB", (64, 48)), Image.new("RGB", (48, 96))], prompt="x", height=48,
                       width=112, num_inference_steps=2, true_cfg_scale=1.0,
                       generator=torch.Generator().manual_seed(0)).images
    finally:
        handle.remove()
    assert out[0].size == (112, 48) and seen == [(96, 160), (192, 96)]  # (h, w): multiples of 32 near 128*128
    with pytest.raises(ValueError, match="only supports batch_size=1"):  # why the family has max_batch=1
        pipe(image=[Image.new("RGB", (64, 48))], prompt=["x", "y"], num_inference_steps=1, height=32, width=32)
    assert edit_calibration_kwargs(None, 64, 80)["image"].size == (80, 64)
    assert [i.size for i in edit_plus_calibration_kwargs(None, 64, 80)["image"]] == [(80, 64)]


def test_tiny_qwen_image_is_built_as_before(tiny_pipes):
    """The text-to-image tiny model is untouched by the edit variants: a QwenImagePipeline (not a tiny subclass)
    whose tokenizer has no vision tokens and whose encoder's image token ids lie past its vocabulary, the same
    weights whatever the way it is asked for, and the edit pipelines share its transformer and VAE weights."""
    from diffusers import QwenImagePipeline

    from pipeline.families import family
    from pipeline.families.qwen_image.tiny import VISION_TOKENS, build_tiny_qwen_image
    from pipeline.models.tiny import tokenizer

    spec = run_config(["model=tiny-qwen-image"]).model.tiny
    default = family("qwen-image").build_tiny(spec, None)
    explicit = build_tiny_qwen_image(spec, None, pipeline_class="QwenImagePipeline")
    assert type(default) is QwenImagePipeline and default.prompt_template_encode_start_idx == 34
    assert default.tokenizer.get_vocab() == tokenizer("qwen", spec.vocab_size).get_vocab()
    assert not set(VISION_TOKENS) & set(default.tokenizer.get_vocab())
    config = default.text_encoder.config
    assert config.image_token_id > config.vocab_size == len(default.tokenizer)
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(default, name).state_dict(), getattr(explicit, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    edit = tiny_pipes("edit")
    for name in ("transformer", "vae"):
        a, b = getattr(default, name).state_dict(), getattr(edit, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    vision = {t: edit.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    assert vision["<|image_pad|>"] == edit.text_encoder.config.image_token_id < len(edit.tokenizer)


def test_a_real_layout_folder_loads_without_torchvision(tiny_pipes, tmp_path):
    """A model folder as Qwen/Qwen-Image-Edit-2509 ships it (processor/ holding the tokenizer and the image
    processor's config) loads through the run's loader; without torchvision transformers could not make its
    Qwen2VLProcessor (the video processor needs torchvision), so the family gives one without a video processor."""
    from transformers import Qwen2VLProcessor
    from transformers.utils import is_torchvision_available

    from pipeline.models.build import _load_pretrained

    pipe, folder = tiny_pipes("plus"), tmp_path / "Qwen-Image-Edit-2509"
    index = {"_class_name": "QwenImageEditPlusPipeline", "processor": ["transformers", "Qwen2VLProcessor"]}
    for name in ("scheduler", "vae", "text_encoder", "tokenizer", "transformer"):
        part = getattr(pipe, name)
        part.save_pretrained(folder / name)
        index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
    pipe.processor.tokenizer.save_pretrained(folder / "processor")
    pipe.processor.image_processor.save_pretrained(folder / "processor")
    (folder / "processor/processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    (folder / "model_index.json").write_text(json.dumps(index))
    loaded = _load_pretrained(run_config(["model=qwen-image-edit-2509", f"model.path={folder}"]).model,
                              torch.float32)
    assert type(loaded).__name__ == "QwenImageEditPlusPipeline" and type(loaded.processor) is Qwen2VLProcessor
    assert loaded.prompt_template_encode_start_idx == 64  # diffusers' own (the real tokenizer's system part)
    if not is_torchvision_available():
        assert loaded.processor.video_processor is None
    got = loaded.processor(text=["<|vision_start|><|image_pad|><|vision_end|>x"], images=[Image.new("RGB", (64, 48))],
                           return_tensors="pt")
    assert int((got["input_ids"] == loaded.text_encoder.config.image_token_id).sum()) > 1


# --- full size, on the meta device -------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [32, 128])
@pytest.mark.parametrize("variant", ["edit", "plus"])
def test_full_size_layout_is_qwen_image_s(variant, rank):
    """Nunchaku's svdq-int4_r{32,128}-qwen-image-edit(-2509) files: Qwen-Image's tensors, names and shapes."""
    from test_nunchaku_files import nunchaku_list

    from pipeline.models.quantized import meta_transformer
    from pipeline.quantization.checkpoint import file_layout

    config = json.loads((CONFIGS / f"{REAL[variant]}.json").read_text())
    assert config == json.loads((CONFIGS / "qwen-image.json").read_text())
    full = meta_transformer(FAMILIES[variant], config, torch.bfloat16)
    layout = file_layout(full, precision="int4", rank=rank)
    ours = {k: (list(shape), str(dtype)) for k, (shape, dtype) in layout.items()}
    assert ours == nunchaku_list("qwen-image", "int4", rank)


def test_published_edit_files_fit_their_models_by_config_and_name(tmp_path):
    """check_file_fits takes an edit file for its model (config shape keys), and inspect names the model a published
    file name says (the three share a shape), with the Lightning sampler where the name says so."""
    from pipeline.inspect import fitting_models, run_commands
    from pipeline.models.quantized import check_file_fits
    from pipeline.quantization.file_info import CheckpointInfo
    from pipeline.quantization.plan import parse_weight_filename

    config = json.loads((CONFIGS / "qwen-image-edit-2509.json").read_text())
    folder = tmp_path / "Qwen-Image-Edit-2509"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "transformer/config.json").write_text(json.dumps(config))
    expected = {"svdq-int4_r32-qwen-image-edit.safetensors": "qwen-image-edit",
                "svdq-fp4_r128-qwen-image-edit-2509.safetensors": "qwen-image-edit-2509",
                "svdq-int4_r32-qwen-image-edit-2509-lightning-8steps-251115.safetensors": "qwen-image-edit-2509",
                "svdq-int4_r32-qwen-image-edit-lightningv1.0-4steps.safetensors": "qwen-image-edit",
                "svdq-int4_r32-qwen-image.safetensors": "qwen-image"}
    for name, model in expected.items():
        info = CheckpointInfo(f"{tmp_path}/{name}", "int4", 32, "diffusers", "qwen-image",
                              "NunchakuQwenImageTransformer2DModel", True, config=config)
        assert fitting_models(info)[0] == [model], name
        if model == "qwen-image-edit-2509":
            check_file_fits(run_config([f"model={model}", f"model.path={folder}"]).model, info)
        if "lightning" in name:
            (command,) = run_commands(tmp_path / name, [model], parse_weight_filename(name), info, False)
            assert command.endswith("sampler=lightning-8step" if "8steps" in name else "sampler=lightning-4step")


def test_the_memory_estimate_is_for_one_image_a_call_with_its_input_tokens(manifests):
    """Edit and Edit-2509 make one image a call; each input adds its 1024*1024-px latents (4096 tokens) and its
    vision tokens (1369 for Edit, 196 per image for Edit-2509) to the sequence."""
    from pipeline.generate import largest_call
    from pipeline.tasks import expand

    for variant, extra in (("edit", 4096 + 1369), ("plus", 2 * (4096 + 196))):
        cfg = run_config([f"model={MODELS[variant]}", f"job.manifest={manifests[variant]}", *SMALL,
                          "job.on_error=skip"])
        work = largest_call(list(expand(load_manifest(cfg).rows, cfg, {})), 4, 2, cfg.model.family)
        assert (work.batch_size, work.extra_tokens) == (1, extra)
