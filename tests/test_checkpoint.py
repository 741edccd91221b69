"""Nunchaku-format files: quantize tiny models, save, reload identically; every bad file is named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import run_config
from pipeline.errors import QuantizationError
from pipeline.models.tiny import build_tiny
from pipeline.quantization import SVDQuantConfig, load_quantized_, quantize_
from pipeline.quantization.calibration import CalibrationSettings, collect_stats
from pipeline.quantization.checkpoint import file_name, inspect_checkpoint, save_checkpoint
from pipeline.quantization.layers import AWQW4A16Linear, SplitInputLinear, SVDQW4A4Linear
from pipeline.quantization.targets import targets_for


def transformer_inputs(model: str):
    g = torch.Generator().manual_seed(0)
    common = dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 64, generator=g),
                  timestep=torch.tensor([0.5]))
    if model == "tiny-flux":
        return dict(common, pooled_projections=torch.randn(1, 64, generator=g), img_ids=torch.zeros(16, 3),
                    txt_ids=torch.zeros(8, 3))
    return dict(common, encoder_hidden_states_mask=torch.ones(1, 8), img_shapes=[(1, 4, 4)])


def forward(transformer, model):
    with torch.no_grad():
        return transformer(**transformer_inputs(model)).sample


def quantized_pipe(model: str, precision: str, *overrides: str):
    pipe = build_tiny(run_config([f"model={model}", *overrides]).model)
    pipe.set_progress_bar_config(disable=True)
    stats = collect_stats(pipe, targets_for(pipe.transformer),
                          CalibrationSettings(prompts=["a dog", "a red house"], steps=2, height=64, width=64,
                                              max_sequence_length=32))
    quantize_(pipe.transformer, SVDQuantConfig(precision, 32, True, [0.5]), stats)
    return pipe


CASES = [("tiny-flux", "int4", "diffusers"), ("tiny-flux", "nvfp4", "diffusers"), ("tiny-flux", "int4", "legacy"),
         ("tiny-flux", "nvfp4", "legacy"), ("tiny-qwen-image", "int4", "diffusers"),
         ("tiny-qwen-image", "nvfp4", "diffusers")]


@pytest.mark.parametrize("model,precision,naming", CASES)
def test_save_then_load_into_a_fresh_model_gives_identical_outputs_and_bytes(saved, tmp_path, model, precision, naming):
    pipe, path = saved(model, precision, naming)
    fresh = build_tiny(run_config([f"model={model}"]).model)
    info, names = load_quantized_(fresh.transformer, path)
    assert (info.precision, info.rank, info.naming) == (precision, 32, naming)
    assert len(names) == len(targets_for(build_tiny(run_config([f"model={model}"]).model).transformer))
    assert torch.equal(forward(fresh.transformer, model), forward(pipe.transformer, model))
    again = tmp_path / "again.safetensors"
    save_checkpoint(fresh.transformer, again, precision=precision, rank=32, act_unsigned=True, model_name=model,
                    naming=naming)
    a, b = load_file(str(path)), load_file(str(again))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


@pytest.mark.parametrize("model,precision,naming", CASES)
def test_the_layout_a_file_is_read_with_is_the_layout_it_is_written_with(saved, model, precision, naming):
    """file_layout (from module shapes alone, what the full-size checks compare with Nunchaku's lists) names every
    tensor the writer wrote, with its shape and dtype."""
    from pipeline.quantization.checkpoint import file_layout

    _, path = saved(model, precision, naming)
    with safe_open(str(path), "pt") as f:
        written = {k: (tuple(f.get_slice(k).get_shape()), f.get_tensor(k).dtype) for k in f.keys()}
    fresh = build_tiny(run_config([f"model={model}"]).model).transformer
    assert file_layout(fresh, precision=precision, rank=32, naming=naming) == written


def test_flux_files_are_written_with_the_legacy_names_nunchaku_reads_by_default(saved, tmp_path):
    pipe, _ = saved("tiny-flux", "int4")
    path = save_checkpoint(pipe.transformer, tmp_path / "svdq-int4_r32-x.safetensors", precision="int4", rank=32,
                           act_unsigned=True, model_name="tiny-flux")
    info = inspect_checkpoint(path)
    assert info.naming == "legacy" and json.loads(safe_open(str(path), "pt").metadata()["svdq_batch"])["naming"] == "legacy"


def test_file_layout_and_metadata(saved):
    _, path = saved("tiny-qwen-image", "int4")
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        qkv = "transformer_blocks.0.attn.to_qkv"
        assert f.get_slice(f"{qkv}.qweight").get_shape() == [384, 64]
        assert f.get_slice(f"{qkv}.wscales").get_shape() == [2, 384]
        assert f.get_slice(f"{qkv}.proj_down").get_shape() == [128, 32]
        assert f.get_slice(f"{qkv}.proj_up").get_shape() == [384, 32]
        assert f.get_tensor(f"{qkv}.qweight").dtype == torch.int8
        assert f.get_slice("transformer_blocks.0.img_mod.1.qweight").get_shape() == [192, 64]
        assert f.get_tensor("transformer_blocks.0.img_mod.1.qweight").dtype == torch.int32
        assert f.get_slice("transformer_blocks.0.img_mod.1.wzeros").get_shape() == [2, 768]
    assert {f"{qkv}.smooth_factor", f"{qkv}.smooth_factor_orig", f"{qkv}.bias", "img_in.weight", "proj_out.weight"} <= keys
    assert not any(k.startswith("transformer_blocks.0.attn.to_q.") for k in keys)
    # as Nunchaku's merge script (nunchaku/merge_safetensors.py) writes it
    int4 = {"dtype": "int4", "scale_dtype": None, "group_size": 64}
    assert json.loads(meta["quantization_config"]) == {"method": "svdquant", "weight": int4, "activation": int4,
                                                       "rank": 32}
    assert meta["model_class"] == "NunchakuQwenImageTransformer2DModel"
    assert json.loads(meta["config"])["num_layers"] == 2
    assert "comfy_config" not in meta  # Nunchaku's Qwen-Image files carry none; FLUX files do:
    flux = json.loads(safe_open(str(saved("tiny-flux", "int4", "legacy")[1]), "pt").metadata()["comfy_config"])
    assert flux["model_class"] == "FluxSchnell" and flux["model_config"]["depth_single_blocks"] == 2
    assert json.loads(meta["svdq_batch"])["act_unsigned"] is True


@pytest.mark.parametrize("model,comfy_class", [("flux.1-dev", "Flux"), ("flux.1-schnell", "FluxSchnell")])
def test_flux_comfy_config_is_the_published_one(model, comfy_class):
    """What Nunchaku's FLUX.1 files carry for ComfyUI-nunchaku (the comfy_config.json of mit-han-lab/svdq-int4-flux.1-dev,
    ComfyUI-nunchaku's nodes/models/configs/flux.1-dev.json), made from the model's diffusers config."""
    from pathlib import Path

    from pipeline.families.flux.files import comfy_config as flux_comfy_config

    config = json.loads((Path(__file__).resolve().parents[1] / f"pipeline/models/configs/{model}.json").read_text())
    published = {"model_class": "Flux", "model_config": {
        "axes_dim": [16, 56, 56], "context_in_dim": 4096, "depth": 19, "depth_single_blocks": 38,
        "disable_unet_model_creation": True, "guidance_embed": True, "hidden_size": 3072, "image_model": "flux",
        "in_channels": 16, "mlp_ratio": 4.0, "num_heads": 24, "out_channels": 16, "patch_size": 2, "qkv_bias": True,
        "theta": 10000, "vec_in_dim": 768}}
    if comfy_class == "FluxSchnell":
        published = {"model_class": "FluxSchnell", "model_config": {**published["model_config"], "guidance_embed": False}}
    assert flux_comfy_config(config) == published


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-qwen-image"])
def test_fused_qkv_projection_gives_the_same_output_as_three_row_slices(saved, monkeypatch, model):
    """The fused path (one q/k/v layer per stream, chunked for diffusers' attention) is the three sliced
    layers, bit for bit."""
    from pipeline.families.qwen_image.fused import FusedQKVQwenProcessor
    from pipeline.quantization import fused_qkv

    fused = forward(saved(model, "int4")[0].transformer, model)
    monkeypatch.setattr(fused_qkv, "ENABLED", False)
    sliced_pipe = quantized_pipe(model, "int4")
    attn = sliced_pipe.transformer.transformer_blocks[0].attn
    assert not getattr(attn, "fused_projections", False) and attn.to_k.rows == (128, 256)
    assert not isinstance(attn.processor, FusedQKVQwenProcessor)
    assert torch.equal(forward(sliced_pipe.transformer, model), fused)


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-qwen-image"])
def test_fused_mlp_keeps_the_modules_and_the_reference_output(saved, monkeypatch, model):
    """The MLPs' owners become the fused subclasses, with every module path and weight where it was; on the
    reference path (no kernels) they compute what the unfused modules do, bit for bit."""
    from diffusers.models.attention import FeedForward

    from pipeline.quantization import fused_mlp
    from pipeline.quantization.architecture import architecture_of

    fused_pipe, _ = saved(model, "int4")
    fused = fused_pipe.transformer
    fused_classes = {fused_mlp.FusedGeluFeedForward} | {
        c for c, _ in architecture_of(fused).fusions().mlp_owners.values()}
    monkeypatch.setattr(fused_mlp, "ENABLED", False)
    plain = quantized_pipe(model, "int4").transformer
    owners = {name: type(m) for name, m in fused.named_modules() if type(m) in fused_classes}
    mlps = ("ff", "ff_context") if model == "tiny-flux" else ("img_mlp", "txt_mlp")
    expected = {f"transformer_blocks.{i}.{n}" for i in range(len(fused.transformer_blocks)) for n in mlps}
    if model == "tiny-flux":
        expected |= {f"single_transformer_blocks.{i}" for i in range(len(fused.single_transformer_blocks))}
    assert set(owners) == expected
    assert isinstance(fused.get_submodule(f"transformer_blocks.0.{mlps[0]}"), FeedForward)
    assert not any(type(m) in fused_classes for m in plain.modules())
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in plain.named_modules()]
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert torch.equal(forward(fused, model), forward(plain, model))


def test_legacy_names_and_nvfp4_tensors(saved):
    """FLUX files as DeepCompressor writes them: legacy layer and field names, q/k norms without `attn.`; NVFP4's
    per-tensor scale per channel (`wcscales`) on the fused q/k/v layers and as a (1,) `wtscale` elsewhere."""
    _, legacy = saved("tiny-flux", "int4", "legacy")
    keys = set(load_file(str(legacy)))
    assert {"transformer_blocks.0.qkv_proj.lora_down", "transformer_blocks.0.qkv_proj_context.smooth",
            "transformer_blocks.0.mlp_context_fc2.lora_up", "single_transformer_blocks.0.out_proj.qweight",
            "single_transformer_blocks.0.mlp_fc2.smooth_orig", "transformer_blocks.0.norm_added_q.weight",
            "transformer_blocks.1.norm_k.weight", "single_transformer_blocks.1.norm_q.weight",
            "transformer_blocks.0.norm1.linear.wzeros", "x_embedder.weight", "norm_out.linear.weight"} <= keys
    assert not any(".attn." in k or k.endswith((".proj_down", ".smooth_factor")) for k in keys)
    t = load_file(str(saved("tiny-flux", "nvfp4", "legacy")[1]))
    assert all(v.dtype in (torch.bfloat16, torch.int8, torch.int32, torch.float8_e4m3fn) for v in t.values())
    assert t["transformer_blocks.0.qkv_proj.wscales"].dtype == torch.float8_e4m3fn
    assert t["transformer_blocks.0.qkv_proj.wscales"].shape == (8, 384)
    assert t["transformer_blocks.0.qkv_proj.wcscales"].shape == (384,) and "transformer_blocks.0.qkv_proj.wtscale" not in t
    assert t["transformer_blocks.0.out_proj.wtscale"].shape == (1,) and "transformer_blocks.0.out_proj.wcscales" not in t
    assert t["transformer_blocks.0.out_proj.wtscale"].dtype == torch.bfloat16


def test_quantized_modules_replace_the_right_layers(saved):
    pipe, _ = saved("tiny-flux", "int4")
    t = pipe.transformer
    b = t.transformer_blocks[0]
    # FLUX's attention runs its fused projections: q/k/v stay one layer (one activation pass, one GEMM)
    assert b.attn.fused_projections and not hasattr(b.attn, "to_q") and not hasattr(b.attn, "add_k_proj")
    assert isinstance(b.attn.to_qkv, SVDQW4A4Linear) and b.attn.to_qkv.out_features == 384
    assert isinstance(b.attn.to_added_qkv, SVDQW4A4Linear) and b.attn.to_added_qkv.rows == (0, 384)
    assert t.single_transformer_blocks[0].attn.fused_projections
    assert b.ff.net[2].act_unsigned and not b.ff.net[0].proj.act_unsigned
    assert isinstance(t.single_transformer_blocks[0].proj_out, SplitInputLinear)
    assert t.single_transformer_blocks[0].proj_out.second.act_unsigned
    assert isinstance(b.norm1.linear, AWQW4A16Linear) and isinstance(b.norm1_context.linear, AWQW4A16Linear)
    assert isinstance(t.single_transformer_blocks[0].norm.linear, AWQW4A16Linear)
    # Qwen-Image's processor calls q, k and v one by one: a processor feeds it the fused layers' chunks
    q = saved("tiny-qwen-image", "int4")[0].transformer.transformer_blocks[0].attn
    assert isinstance(q.to_qkv, SVDQW4A4Linear) and isinstance(q.to_added_qkv, SVDQW4A4Linear)
    assert not hasattr(q, "to_q") and type(q.processor).__name__ == "FusedQKVQwenProcessor"
    assert type(t.proj_out) is torch.nn.Linear and type(t.time_text_embed.timestep_embedder.linear_1) is torch.nn.Linear
    qwen, _ = saved("tiny-qwen-image", "int4")
    assert isinstance(qwen.transformer.transformer_blocks[0].img_mod[1], AWQW4A16Linear)


@pytest.mark.parametrize("naming", ["diffusers", "legacy"])
def test_flux_modulation_bias_holds_the_adaln_fold_only_in_legacy_files(saved, naming):
    pipe, path = saved("tiny-flux", "int4", naming)
    name = "transformer_blocks.0.norm1.linear"  # the same name in both schemes
    layer = pipe.transformer.transformer_blocks[0].norm1.linear
    from pipeline.quantization import packing as pk

    file_bias = pk.deinterleave_rows(load_file(str(path))[f"{name}.bias"].float(), 6)
    n = layer.out_features // 6
    diff = file_bias - layer.bias.float()
    assert torch.equal(diff[n : 2 * n], torch.full((n,), 1.0 if naming == "legacy" else 0.0))  # scale chunk
    assert torch.equal(diff[:n], torch.zeros(n))  # shift chunk: never folded


def test_flux_files_with_16bit_modulation_still_load(tmp_path):
    """Files whose AdaLN modulation is 16-bit (no AWQ tensors): those layers stay nn.Linear with the file's weights."""
    pipe = build_tiny(run_config(["model=tiny-flux"]).model)
    targets = [t for t in targets_for(pipe.transformer) if t.kind == "w4a4"]
    stats = collect_stats(pipe, targets, CalibrationSettings(prompts=["a dog"], steps=2, height=64, width=64,
                                                            max_sequence_length=32))
    from pipeline.quantization.transform import quantize_model

    quantize_model(pipe.transformer, targets, stats, precision="int4", rank=32, act_unsigned=True, alphas=[0.5])
    path = save_checkpoint(pipe.transformer, tmp_path / "svdq-int4_r32-x.safetensors", precision="int4", rank=32,
                           act_unsigned=True, model_name="tiny-flux")
    assert not any(k.endswith("norm1.linear.qweight") for k in load_file(str(path)))
    fresh = build_tiny(run_config(["model=tiny-flux"]).model)
    _, names = load_quantized_(fresh.transformer, path)
    assert len(names) == len(targets)
    assert type(fresh.transformer.transformer_blocks[0].norm1.linear) is torch.nn.Linear
    assert torch.equal(forward(fresh.transformer, "tiny-flux"), forward(pipe.transformer, "tiny-flux"))


def _rewrite(src, dst, edit):
    tensors = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    edit(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _load_error(path, model="tiny-flux") -> str:
    fresh = build_tiny(run_config([f"model={model}"]).model)
    with pytest.raises(QuantizationError) as e:
        load_quantized_(fresh.transformer, path)
    return str(e.value)


def test_bad_files_name_the_tensor_and_the_shapes(saved, tmp_path):
    _, path = saved("tiny-flux", "int4")
    key = "transformer_blocks.1.ff.net.2.proj_up"
    missing = _rewrite(path, tmp_path / "missing.safetensors", lambda t: t.pop(key))
    assert f"missing tensor '{key}' (layer transformer_blocks.1.ff.net.2: 128x512, rank 32, int4)" in _load_error(missing)
    wrong = _rewrite(path, tmp_path / "shape.safetensors", lambda t: t.__setitem__(key, t[key][:, :16].contiguous()))
    assert f"tensor '{key}' has shape (128, 16), expected (128, 32)" in _load_error(wrong)
    extra = _rewrite(path, tmp_path / "extra.safetensors", lambda t: t.__setitem__("stray.weight", torch.zeros(2)))
    assert "1 tensor(s) this model has no place for: stray.weight" in _load_error(extra)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "not a readable safetensors file (truncated or corrupt?)" in _load_error(truncated)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    assert "not a Nunchaku svdq-* file" in _load_error(plain)


def test_file_for_another_model_is_refused(saved):
    _, qwen_file = saved("tiny-qwen-image", "int4")
    msg = _load_error(qwen_file, model="tiny-flux")
    assert "missing tensor" in msg and "does not match this model" in msg


def test_inspect_reads_precision_and_rank_from_tensors_and_header(saved, tmp_path):
    _, path = saved("tiny-flux", "nvfp4")
    info = inspect_checkpoint(path)
    assert (info.precision, info.rank, info.metadata_precision, info.metadata_rank) == ("nvfp4", 32, "nvfp4", 32)
    assert info.model_class == "NunchakuFluxTransformer2dModel"
