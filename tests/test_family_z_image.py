"""Z-Image (Turbo): the tiny pipeline through the real runner, quantized and not; a file written, read back and
rewritten bit for bit; the full-size file layout against what Nunchaku's Z-Image loader builds
(nunchaku/models/transformers/transformer_zimage.py); files of another family refused.

Cheap on purpose: the tiny pipeline is built and quantized once per module, images are 64x64, runs take 2 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import run_config
from pipeline.errors import QuantizationError
from pipeline.models.tiny import build_tiny
from pipeline.quantization import SVDQuantConfig, load_quantized_, quantize_
from pipeline.quantization.calibration import CalibrationSettings, collect_stats
from pipeline.quantization.checkpoint import file_layout, file_name, inspect_checkpoint, save_checkpoint
from pipeline.quantization.layers import SVDQW4A4Linear
from pipeline.quantization.targets import targets_for

CONFIGS = Path(__file__).resolve().parents[1] / "pipeline/models/configs"
SMALL = ["sampler.steps=2", "sampler.height=64", "sampler.width=64", "sampler.max_sequence_length=64",
         "job.limit=1", "job.progress=none"]
CHEAP_CALIBRATION = ["quantization.calibration.num_prompts=1", "quantization.calibration.steps=1",
                     "quantization.calibration.alphas=[0.5]"]


def tiny_pipe():
    pipe = build_tiny(run_config(["model=tiny-z-image"]).model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transformer_inputs():
    """One image's latents (16 channels, 1 frame, 8x8) and an 8-token caption, as ZImagePipeline passes them."""
    g = torch.Generator().manual_seed(0)
    return dict(x=[torch.randn(16, 1, 8, 8, generator=g)], t=torch.tensor([0.5]),
                cap_feats=[torch.randn(8, 64, generator=g)], return_dict=False)


def forward(transformer):
    with torch.no_grad():
        return transformer(**transformer_inputs())[0][0]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(tiny pipe quantized int4 r32 in process, its file)."""
    pipe = tiny_pipe()
    stats = collect_stats(pipe, targets_for(pipe.transformer),
                          CalibrationSettings(prompts=["a dog"], steps=1, height=64, width=64,
                                              max_sequence_length=32, call_kwargs={"guidance_scale": 0.0}))
    quantize_(pipe.transformer, SVDQuantConfig("int4", 32, True, [0.5]), stats)
    path = tmp_path_factory.mktemp("zimage") / file_name("int4", 32, "tiny-z-image")
    save_checkpoint(pipe.transformer, path, precision="int4", rank=32, act_unsigned=True, model_name="tiny-z-image")
    return pipe, path


def test_tiny_model_is_the_real_architecture_and_reproducible():
    a, b = tiny_pipe(), tiny_pipe()
    assert (type(a).__name__, type(a.transformer).__name__, type(a.text_encoder).__name__) == (
        "ZImagePipeline", "ZImageTransformer2DModel", "Qwen3Model")
    sa, sb = a.transformer.state_dict(), b.transformer.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [len(getattr(a.transformer, s)) for s in ("noise_refiner", "context_refiner", "layers")] == [2, 2, 2]


def test_runs_through_the_runner_quantized_and_not(tmp_path):
    from pipeline.runner import run_job

    plain = run_job(run_config(["model=tiny-z-image", "quantization=none", *SMALL]), tmp_path / "none")
    quant = run_job(run_config(["model=tiny-z-image", "quantization=int4_r32", "job.compare_to_unquantized=true",
                                *CHEAP_CALIBRATION, *SMALL]), tmp_path / "int4")
    assert plain["counts"]["made"] == quant["counts"]["made"] == 1
    summary = quant["quantization"]["summary"]
    assert summary["source"] == "calibrated" and summary["layers_swapped"] == 24  # 4 per block, 6 blocks
    psnr = quant["quality"]["psnr_vs_unquantized_mean"]
    assert np.isfinite(psnr) and psnr > 5
    images = [np.asarray(Image.open(tmp_path / d / "cat_0.png")) for d in ("none", "int4")]
    assert images[0].shape == (64, 64, 3) and not np.array_equal(*images)


def test_save_then_load_gives_identical_outputs_and_bytes(quantized, tmp_path):
    pipe, path = quantized
    fresh = tiny_pipe()
    info, names = load_quantized_(fresh.transformer, path)
    assert (info.precision, info.rank, info.naming, info.family) == ("int4", 32, "diffusers", "z-image")
    assert info.model_class == "NunchakuZImageTransformer2DModel"
    assert info.blocks == {"n_refiner_layers": 2, "n_layers": 2} and info.w4a4_layers == 24 and info.awq_layers == 0
    assert len(names) == 24
    assert torch.equal(forward(fresh.transformer), forward(pipe.transformer))
    again = tmp_path / "again.safetensors"
    save_checkpoint(fresh.transformer, again, precision="int4", rank=32, act_unsigned=True,
                    model_name="tiny-z-image")
    a, b = load_file(str(path)), load_file(str(again))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def test_a_real_layout_folder_without_transformer_weights_runs_from_the_file(quantized, tmp_path):
    """model=z-image-turbo with model.path at a diffusers folder whose transformer weights are gone: the file fills
    the transformer (built from transformer/config.json); the same image as the tiny model with the same file."""
    from pipeline.runner import run_job

    _, path = quantized
    folder = tmp_path / "Z-Image-Turbo"
    tiny_pipe().save_pretrained(folder)
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.unlink()
    real = run_job(run_config(["model=z-image-turbo", f"model.path={folder}", f"quantization.path={path}", *SMALL]),
                   tmp_path / "real")
    summary = real["quantization"]["summary"]
    assert real["counts"]["made"] == 1 and summary["source"] == "file" and summary["layers_swapped"] == 24
    tiny = run_job(run_config(["model=tiny-z-image", f"quantization.path={path}", *SMALL]), tmp_path / "tiny")
    assert tiny["counts"]["made"] == 1
    pixels = [np.asarray(Image.open(tmp_path / d / "cat_0.png")) for d in ("real", "tiny")]
    assert np.array_equal(*pixels)


def test_file_holds_nunchakus_names_and_the_layout_it_is_read_with(quantized):
    _, path = quantized
    with safe_open(str(path), "pt") as f:
        written = {k: (tuple(f.get_slice(k).get_shape()), f.get_tensor(k).dtype) for k in f.keys()}
        meta = f.metadata()
    assert file_layout(tiny_pipe().transformer, precision="int4", rank=32) == written
    p = "layers.1."
    assert written[f"{p}attention.to_qkv.qweight"] == ((3 * 384, 192), torch.int8)
    assert written[f"{p}feed_forward.net.0.proj.proj_up"] == ((2 * 1024, 32), torch.bfloat16)
    assert written[f"{p}feed_forward.net.2.wscales"] == ((1024 // 64, 384), torch.bfloat16)
    assert f"{p}adaLN_modulation.0.weight" in written  # the modulation stays 16-bit, as in Nunchaku's files
    assert not any(k.endswith(".bias") and ("attention." in k or "feed_forward." in k) for k in written)
    assert not any(".to_q." in k or ".w1." in k for k in written)
    assert json.loads(meta["quantization_config"])["rank"] == 32
    assert json.loads(meta["config"])["n_layers"] == 2 and "comfy_config" not in meta


def test_swiglu_rows_are_w3_then_w1_and_qkv_runs_fused(quantized):
    """Nunchaku runs net.0.proj through diffusers' SwiGLU (first half x silu(second half)): our w3 and w1 are those
    halves of the one file layer; q/k/v run as the fused layer through diffusers' own processor code."""
    from pipeline.families.z_image.fused import FusedQKVZImageProcessor

    pipe, _ = quantized
    ff = pipe.transformer.layers[0].feed_forward
    assert (ff.w3.ckpt_name, ff.w3.rows, ff.w1.ckpt_name, ff.w1.rows) == (
        "layers.0.feed_forward.net.0.proj", (0, 1024), "layers.0.feed_forward.net.0.proj", (1024, 2048))
    assert ff.w3.proj_down is ff.w1.proj_down and not ff.w2.act_unsigned  # SwiGLU outputs are signed
    attn = pipe.transformer.layers[0].attention
    assert isinstance(attn.to_qkv, SVDQW4A4Linear) and not hasattr(attn, "to_q")
    assert isinstance(attn.processor, FusedQKVZImageProcessor)


def test_fused_qkv_gives_the_row_slices_output(quantized, monkeypatch):
    from pipeline.quantization import fused_qkv

    _, path = quantized
    fused = tiny_pipe().transformer
    load_quantized_(fused, path)
    monkeypatch.setattr(fused_qkv, "ENABLED", False)
    sliced = tiny_pipe().transformer
    load_quantized_(sliced, path)
    assert isinstance(sliced.layers[0].attention.to_q, SVDQW4A4Linear)
    torch.testing.assert_close(forward(fused), forward(sliced), rtol=1e-4, atol=1e-5)


def test_blocks_stream_in_run_order_with_bit_identical_output(quantized):
    """BLOCK_STACKS drive per-block streaming: refiners, then the joint layers, one copy each per forward."""
    from pipeline.models.block_offload import stream_blocks, transformer_blocks

    _, path = quantized
    transformer = tiny_pipe().transformer
    load_quantized_(transformer, path)
    blocks = transformer_blocks(transformer)
    assert blocks == [*transformer.noise_refiner, *transformer.context_refiner, *transformer.layers]
    reference = forward(transformer)
    order = []
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: order.append(i))
    streamer = stream_blocks(transformer, torch.device("cpu"), 1)
    assert torch.equal(forward(transformer), reference)
    assert order == list(range(6)) and streamer.loads == 5
    streamer.remove()


def nunchaku_layout(config: dict, precision: str, rank: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The state dict NunchakuZImageTransformer2DModel loads (strictly) for a diffusers config, written from its
    source: ZImageTransformer2DModel's tensors, except that in every block of layers, noise_refiner and
    context_refiner (skip_refiners=False) to_q/to_k/to_v become one SVDQW4A4Linear `attention.to_qkv`,
    `attention.to_out.0` one too, and the FeedForward (w1, w2, w3) diffusers' SwiGLU FeedForward whose
    `net.0.proj` (2 x hidden rows) and `net.2` are SVDQW4A4Linear; the linears have no bias, so neither do they.
    SVDQW4A4Linear: qweight (N, K/2) int8, wscales (K/G, N), smooth_factor(_orig) (K,), proj_down (K, r),
    proj_up (N, r); NVFP4: wcscales (N,) (its loader fills missing ones and takes a file's wtscale instead)."""
    from pipeline.models.quantized import meta_transformer

    base = meta_transformer("z-image", config, torch.bfloat16)
    dim = config["dim"]
    hidden = int(dim / 3 * 8)
    layout = {}
    for key, t in base.state_dict().items():
        if not any(f".{m}." in key for m in ("to_q", "to_k", "to_v", "to_out", "w1", "w2", "w3")):
            layout[key] = (tuple(t.shape), t.dtype)
    group = 64 if precision == "int4" else 16
    scales = torch.bfloat16 if precision == "int4" else torch.float8_e4m3fn
    for stack, count in (("noise_refiner", config["n_refiner_layers"]), ("context_refiner", config["n_refiner_layers"]),
                         ("layers", config["n_layers"])):
        for i in range(count):
            for name, n, k in (("attention.to_qkv", 3 * dim, dim), ("attention.to_out.0", dim, dim),
                               ("feed_forward.net.0.proj", 2 * hidden, dim), ("feed_forward.net.2", dim, hidden)):
                p = f"{stack}.{i}.{name}"
                layout.update({f"{p}.qweight": ((n, k // 2), torch.int8), f"{p}.wscales": ((k // group, n), scales),
                               f"{p}.smooth_factor": ((k,), torch.bfloat16),
                               f"{p}.smooth_factor_orig": ((k,), torch.bfloat16),
                               f"{p}.proj_down": ((k, rank), torch.bfloat16),
                               f"{p}.proj_up": ((n, rank), torch.bfloat16)})
    return layout


@pytest.mark.parametrize("precision,rank", [("int4", 32), ("int4", 128), ("nvfp4", 32)])
def test_full_size_layout_is_the_one_nunchakus_loader_builds(precision, rank):
    from pipeline.models.quantized import meta_transformer

    config = json.loads((CONFIGS / "z-image-turbo.json").read_text())
    ours = file_layout(meta_transformer("z-image", config, torch.bfloat16), precision=precision, rank=rank)
    theirs = nunchaku_layout(config, precision, rank)
    if precision == "int4":
        assert ours == theirs
        assert len(ours) == 1099  # 34 blocks x 4 layers x 6 tensors; 6 norms per block, 2 modulation (32 blocks); 15
    else:  # our NVFP4 scales: wcscales on the fused layers (to_qkv, net.0.proj), a (1,) wtscale on the others
        scale = {k for k in ours if k.endswith((".wcscales", ".wtscale"))}
        assert {k: v for k, v in ours.items() if k not in scale} == theirs
        assert all(ours[k] == ((1,), torch.bfloat16) for k in scale if k.endswith(".wtscale"))
    assert ours["layers.29.attention.to_qkv.qweight"] == ((11520, 1920), torch.int8)
    assert ours["layers.0.feed_forward.net.0.proj.proj_up"] == ((20480, rank), torch.bfloat16)
    assert ours["layers.0.feed_forward.net.2.proj_down"] == ((10240, rank), torch.bfloat16)
    assert ours["noise_refiner.1.adaLN_modulation.0.weight"] == ((15360, 256), torch.bfloat16)
    assert "context_refiner.0.adaLN_modulation.0.weight" not in ours  # the context refiner has no modulation
    assert ours["cap_embedder.1.weight"] == ((3840, 2560), torch.bfloat16)


def test_full_size_file_is_recognised_and_fits_only_z_image_turbo(tmp_path):
    from pipeline.inspect import describe
    from pipeline.models.quantized import meta_transformer
    from pipeline.quantization.file_info import quantization_config
    from pipeline.quantization.synthetic import write_sparse_checkpoint

    config = json.loads((CONFIGS / "z-image-turbo.json").read_text())
    layout = file_layout(meta_transformer("z-image", config, torch.bfloat16), precision="int4", rank=32)
    path = tmp_path / "svdq-int4_r32-z-image-turbo.safetensors"
    metadata = {"config": json.dumps(config), "model_class": "NunchakuZImageTransformer2DModel",
                "quantization_config": json.dumps({**quantization_config("int4", 32), "skip_refiners": False})}
    write_sparse_checkpoint(path, layout, metadata)  # the metadata Nunchaku's merge_safetensors.py writes
    d = describe(path)
    assert (d["family"], d["precision"], d["rank"], d["w4a4_layers"], d["awq_layers"]) == (
        "z-image", "int4", 32, 136, 0)
    assert d["blocks"] == {"n_layers": 30, "n_refiner_layers": 2} and d["fits"] == ["z-image-turbo"]
    assert "nunchaku" in d["naming_readers"] and d["ok"]


def test_a_file_of_another_family_is_refused(quantized, tmp_path):
    from pipeline.models.quantized import check_file_fits
    from pipeline.quantization.checkpoint import load_checkpoint

    _, path = quantized
    qwen = tmp_path / "svdq-int4_r32-qwen-image.safetensors"
    save_file({"transformer_blocks.0.img_mlp.net.2.proj_down": torch.zeros(128, 32, dtype=torch.bfloat16),
               "transformer_blocks.0.img_mod.1.qweight": torch.zeros(8, 8, dtype=torch.int32)}, str(qwen))
    info = inspect_checkpoint(qwen)
    with pytest.raises(QuantizationError, match="holds a qwen-image transformer .* model=tiny-z-image is a z-image"):
        check_file_fits(run_config(["model=tiny-z-image"]).model, info)
    with pytest.raises(QuantizationError, match="holds a z-image transformer .* model=tiny-flux is a flux"):
        check_file_fits(run_config(["model=tiny-flux"]).model, inspect_checkpoint(path))
    check_file_fits(run_config(["model=tiny-z-image"]).model, inspect_checkpoint(path))  # its own model: fits
    flux = build_tiny(run_config(["model=tiny-flux"]).model).transformer
    with pytest.raises(QuantizationError, match="missing tensor .* does not match this model"):
        load_checkpoint(flux, path, inspect_checkpoint(path), act_unsigned=True)


def test_prompt_token_limit_is_the_pipelines_cut():
    """ZImagePipeline tokenizes the chat-templated prompt and cuts it to max_sequence_length: the count says how many
    of the prompt's tokens are lost exactly when the pipeline keeps fewer than the whole templated prompt."""
    from pipeline.models.prompt_limits import token_counts

    pipe = tiny_pipe()
    prompt = "a photo of a cat sitting on a red chair in the sun, " * 3
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=True)
    templated = len(pipe.tokenizer(text).input_ids)
    for limit in (templated - 7, templated, templated + 3):
        (cut,) = token_counts(pipe, "z-image", prompt, limit)
        assert cut.encoder == "qwen3" and cut.dropped == max(0, templated - limit)
