"""LoRA files -> LoraWeights (pipeline/lora/files.py).

Every format is made in-process under its real key names and alpha conventions: the diffusers form by PEFT itself
(diffusers' `add_adapter` + `save_lora_adapter`, random A and B, lora_alpha != r, a rank and an alpha pattern), the
others by writing the same LoRA under their names (fused q/k/v and FLUX's single-block linear1 as block-diagonal
LoRAs, the AdaLN shift/scale swap of FLUX's final layer, alphas chosen so that alpha / rank is no power of two).
Each must read back to the same delta W = scale * up @ down per module. Then the errors: unknown keys (nearest
names; strict=False lists them), another architecture, another width, truncated and missing files.

Cheap on purpose: only the tiny transformers (no pipelines), built once per module.
"""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_config
from pipeline.errors import LoraError
from pipeline.lora.files import made_for, read_lora

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors of a few thousand elements: one CPU thread (with two, every op waits for the second on a busy
    machine); restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ALPHA = 3.0  # the alpha the kohya-style files are written with: alpha / rank is no power of two


def tiny_transformer(model: str):
    from pipeline.models.quantized import transformer_class
    from pipeline.models.tiny import seeded, tiny_transformer_config

    cfg = run_config([f"model={model}"]).model
    return seeded(cfg.tiny.seed, lambda: transformer_class(cfg.family).from_config(
        tiny_transformer_config(cfg.family, cfg.tiny)))


def peft_lora(transformer, tmp, targets, **config):
    """PEFT's LoRA on a copy of `transformer`, saved as diffusers saves it -> (file, {module: (down, up, scaling)})."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    model = copy.deepcopy(transformer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model.add_adapter(LoraConfig(target_modules=targets, init_lora_weights=False, **config))
    truth = {}
    for name, m in model.named_modules():
        if isinstance(m, PeftLoraLayer) and "default" in m.lora_A:
            truth[name] = (m.lora_A["default"].weight.detach().clone() * 0.1,
                           m.lora_B["default"].weight.detach().clone() * 0.1, m.scaling["default"])
            m.lora_A["default"].weight.data.copy_(truth[name][0])  # small values: delta W of order 1e-2
            m.lora_B["default"].weight.data.copy_(truth[name][1])
    assert sorted(truth) == sorted(targets)
    model.save_lora_adapter(str(tmp), weight_name="peft.safetensors")
    return tmp / "peft.safetensors", truth


def delta(down, up, scale):
    return scale * (up @ down)


def assert_same(weights, truth, modules):
    assert sorted(weights.layers) == sorted(modules)
    for m in modules:
        layer = weights.layers[m]
        assert layer.down.dtype == layer.up.dtype == torch.float32
        assert layer.down.shape[0] == layer.up.shape[1]
        got, want = delta(layer.down, layer.up, layer.scale), delta(*truth[m])
        assert got.shape == want.shape, m
        assert (got - want).abs().max() <= 1e-6, m  # delta W is of order 1e-2 here


def fused(truth, members, alpha=None, swap=False):
    """One LoRA for several layers stacked by output (q/k/v, linear1): block-diagonal, so each member keeps its
    own A and B; with `alpha`, the ups are divided by alpha / rank (the file means scale * up @ down); `swap`:
    the two halves of the up rows exchanged (BFL's final-layer AdaLN is (shift, scale), diffusers' (scale, shift))."""
    downs = [truth[m][0] for m in members]
    rank = sum(d.shape[0] for d in downs)
    scale = 1.0 if alpha is None else alpha / rank
    ups = [truth[m][1] * truth[m][2] / scale for m in members]
    up = torch.block_diag(*ups)
    if swap:
        shift, scl = up.chunk(2, dim=0)
        up = torch.cat([scl, shift])
    return torch.cat(downs).contiguous(), up.contiguous()


# FLUX: (BFL name, diffusers members, swap) per block; XLabs' names for the layers its processors train.
def flux_bfl_layout(double, single):
    out = []
    for i in range(double):
        d, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        out += [(d + "img_attn.qkv", [t + "attn.to_q", t + "attn.to_k", t + "attn.to_v"]),
                (d + "img_attn.proj", [t + "attn.to_out.0"]), (d + "img_mlp.0", [t + "ff.net.0.proj"]),
                (d + "img_mlp.2", [t + "ff.net.2"]), (d + "img_mod.lin", [t + "norm1.linear"]),
                (d + "txt_attn.qkv", [t + "attn.add_q_proj", t + "attn.add_k_proj", t + "attn.add_v_proj"]),
                (d + "txt_attn.proj", [t + "attn.to_add_out"]), (d + "txt_mlp.0", [t + "ff_context.net.0.proj"]),
                (d + "txt_mlp.2", [t + "ff_context.net.2"]), (d + "txt_mod.lin", [t + "norm1_context.linear"])]
    for i in range(single):
        s, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        out += [(s + "linear1", [t + "attn.to_q", t + "attn.to_k", t + "attn.to_v", t + "proj_mlp"]),
                (s + "linear2", [t + "proj_out"]), (s + "modulation.lin", [t + "norm.linear"])]
    out += [("final_layer.linear", ["proj_out"]), ("final_layer.adaLN_modulation.1", ["norm_out.linear"]),
            ("img_in", ["x_embedder"]), ("txt_in", ["context_embedder"])]
    return out


def flux_xlabs_layout(double, single):
    out = []
    for i in range(double):
        d, t = f"double_blocks.{i}.processor.", f"transformer_blocks.{i}.attn."
        out += [(d + "qkv_lora1", [t + "to_q", t + "to_k", t + "to_v"]), (d + "proj_lora1", [t + "to_out.0"]),
                (d + "qkv_lora2", [t + "add_q_proj", t + "add_k_proj", t + "add_v_proj"]),
                (d + "proj_lora2", [t + "to_add_out"])]
    for i in range(single):
        s, t = f"single_blocks.{i}.processor.", f"single_transformer_blocks.{i}."
        out += [(s + "qkv_lora", [t + "attn.to_q", t + "attn.to_k", t + "attn.to_v"]),
                (s + "proj_lora", [t + "proj_out"])]
    return out


def _complete(layout, truth):
    return [(name, members) for name, members in layout if all(m in truth for m in members)]


def write(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def flux_file(tmp, truth, fmt):
    """The LoRA `truth` in FLUX format `fmt` -> (file, the diffusers modules it holds)."""
    t, modules = {}, []
    if fmt == "xlabs":  # no alpha: the scale is in the weights
        for name, members in _complete(flux_xlabs_layout(2, 2), truth):
            t[f"{name}.down.weight"], t[f"{name}.up.weight"] = fused(truth, members)
            modules += members
        return write(tmp / "xlabs.safetensors", t), modules
    if fmt in ("diffusers-alpha", "ai-toolkit", "peft-dir"):
        for m, (down, up, scaling) in truth.items():
            if fmt == "diffusers-alpha":  # network alphas, as diffusers' kohya conversions used to write them
                t[f"transformer.{m}.lora_A.weight"] = down
                t[f"transformer.{m}.lora_B.weight"] = up * scaling * down.shape[0] / ALPHA
                t[f"transformer.{m}.alpha"] = torch.tensor(ALPHA)
            elif fmt == "ai-toolkit":  # diffusers names under `transformer.`, the scale folded in, no alpha
                t[f"transformer.{m}.lora_A.weight"], t[f"transformer.{m}.lora_B.weight"] = down, up * scaling
            else:
                t[f"base_model.model.{m}.lora_A.weight"], t[f"base_model.model.{m}.lora_B.weight"] = down, up
        if fmt == "peft-dir":  # PEFT's save_pretrained: adapter_model.safetensors + adapter_config.json
            (tmp / "peft").mkdir()
            (tmp / "peft/adapter_config.json").write_text(json.dumps(
                {"r": 4, "lora_alpha": 8, "rank_pattern": {"ff.net.2": 2}, "alpha_pattern": {"norm1_context.linear": 5},
                 "peft_type": "LORA"}))
            return write(tmp / "peft/adapter_model.safetensors", t), list(truth)
        meta = {"software": json.dumps({"name": "ai-toolkit", "version": "0.1"})} if fmt == "ai-toolkit" else None
        return write(tmp / f"{fmt}.safetensors", t, meta), list(truth)
    for name, members in _complete(flux_bfl_layout(2, 2), truth):
        down, up = fused(truth, members, ALPHA, swap=name.startswith("final_layer.adaLN"))
        if fmt == "kohya":
            stem, parts = "lora_unet_" + name.replace(".", "_"), ("lora_down", "lora_up")
        elif fmt == "bfl":  # ComfyUI's spelling of BFL names
            stem, parts = "diffusion_model." + name, ("lora_A", "lora_B")
        elif fmt == "bfl-bare":
            stem, parts = name, ("lora_A", "lora_B")
        else:  # comfyui with kohya's matrix names
            stem, parts = "diffusion_model." + name, ("lora_down", "lora_up")
        t[f"{stem}.{parts[0]}.weight"], t[f"{stem}.{parts[1]}.weight"] = down, up
        t[f"{stem}.alpha"] = torch.tensor(ALPHA)
        modules += members
    meta = {"ss_network_module": "networks.lora_flux"} if fmt == "kohya" else None
    return write(tmp / f"{fmt}.safetensors", t, meta), modules


FLUX_TARGETS = [
    *[f"transformer_blocks.0.{m}" for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
        "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        "norm1.linear", "norm1_context.linear")],
    "transformer_blocks.1.attn.to_q", "transformer_blocks.1.attn.to_k", "transformer_blocks.1.attn.to_v",
    *[f"single_transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out",
                                                    "norm.linear")],
    "single_transformer_blocks.1.proj_out", "single_transformer_blocks.1.norm.linear",
    "norm_out.linear", "proj_out", "x_embedder", "context_embedder",
]


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    transformer = tiny_transformer("tiny-flux")
    tmp = tmp_path_factory.mktemp("flux")
    path, truth = peft_lora(transformer, tmp, FLUX_TARGETS, r=4, lora_alpha=8, rank_pattern={"ff.net.2": 2},
                            alpha_pattern={"norm1_context.linear": 5})
    return transformer, path, truth


def test_flux_diffusers_file_made_by_peft(flux):
    transformer, path, truth = flux
    w = read_lora(path, transformer, "flux")
    assert (w.format, w.family, w.name, w.ignored) == ("diffusers", "flux", "peft", ())
    assert w.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert w.layers["transformer_blocks.0.attn.to_q"].scale == 2.0  # lora_alpha / r from the stored LoraConfig
    assert w.layers["transformer_blocks.0.ff.net.2"].rank == 2
    assert w.layers["transformer_blocks.0.norm1_context.linear"].scale == 5 / 4
    assert_same(w, truth, FLUX_TARGETS)
    # the same through `flux-kontext` (same architecture), and against the meta-device transformer run.py passes
    from pipeline.models.quantized import meta_transformer

    meta = meta_transformer("flux", dict(transformer.config), torch.bfloat16)
    assert_same(read_lora(path, meta, "flux-kontext"), truth, FLUX_TARGETS)


def test_flux_file_saved_by_the_pipeline(flux, tmp_path):
    """FluxPipeline.save_lora_weights: keys and LoraConfig under `transformer.` (with a text-encoder LoRA beside)."""
    from diffusers import FluxPipeline
    from safetensors import safe_open

    transformer, path, truth = flux
    with safe_open(str(path), framework="pt") as f:
        layers, config = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["lora_adapter_metadata"])
    te = {"text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
          "text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)}
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config,
                                   text_encoder_lora_layers=te, text_encoder_lora_adapter_metadata={"r": 2,
                                                                                                   "lora_alpha": 2})
    w = read_lora(tmp_path / "pytorch_lora_weights.safetensors", transformer, "flux")
    assert sorted(w.ignored) == sorted(f"text_encoder.{k}" for k in te)
    assert_same(w, truth, FLUX_TARGETS)


@pytest.mark.parametrize("fmt", ["kohya", "bfl", "bfl-bare", "comfyui", "xlabs", "diffusers-alpha", "ai-toolkit",
                                 "peft-dir"])
def test_flux_formats_give_the_same_layers(flux, tmp_path, fmt):
    transformer, _, truth = flux
    path, modules = flux_file(tmp_path, truth, fmt)
    w = read_lora(path, transformer, "flux")
    label = {"bfl-bare": "bfl", "comfyui": "bfl", "diffusers-alpha": "diffusers", "peft-dir": "peft"}.get(fmt, fmt)
    assert (w.format, w.family, w.ignored) == (label, "flux", ())
    assert_same(w, truth, modules)
    if fmt != "xlabs":  # XLabs trains attention only
        assert sorted(modules) == sorted(truth)


def test_flux_kohya_in_bf16_and_fp16(flux, tmp_path):
    """Half-precision files: read as fp32 before the splits, so the layers are the file's values exactly."""
    transformer, _, truth = flux
    path, modules = flux_file(tmp_path, truth, "kohya")
    from safetensors.torch import load_file

    for dtype in (torch.bfloat16, torch.float16):
        half = write(tmp_path / f"{dtype}.safetensors", {k: v.to(dtype) for k, v in load_file(path).items()})
        rounded = {}
        w = read_lora(half, transformer, "flux")
        for name, members in _complete(flux_bfl_layout(2, 2), truth):
            down, up = fused(truth, members, ALPHA, swap=name.startswith("final_layer.adaLN"))
            down, up = down.to(dtype).float(), up.to(dtype).float()
            if name.startswith("final_layer.adaLN"):
                shift, scl = up.chunk(2, dim=0)
                up = torch.cat([scl, shift])
            rows = 0
            ranks = 0
            for m in members:
                r, o = truth[m][0].shape[0], truth[m][1].shape[0]
                rounded[m] = (down[ranks:ranks + r], up[rows:rows + o, ranks:ranks + r], ALPHA / down.shape[0])
                rows, ranks = rows + o, ranks + r
        assert_same(w, rounded, modules)


def test_flux_mixture_names(flux, tmp_path):
    """The `lora_transformer_*` kohya variant (diffusers names flattened; its converter maps attention layers and
    the embedders only), alpha per layer."""
    transformer, _, truth = flux
    modules = [m for m in truth if ".attn." in m or "." not in m or m == "norm_out.linear"]
    t = {}
    for m in modules:
        down, up, scaling = truth[m]
        stem = "lora_transformer_" + m.replace(".", "_")
        t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = down, up * scaling * down.shape[0] / ALPHA
        t[f"{stem}.alpha"] = torch.tensor(ALPHA)
    w = read_lora(write(tmp_path / "mixture.safetensors", t), transformer, "flux")
    assert w.format == "kohya"
    assert_same(w, truth, modules)


def test_a_layer_held_twice(flux, tmp_path):
    transformer, _, truth = flux
    path, _ = flux_file(tmp_path, truth, "kohya")
    down, up, _ = truth["transformer_blocks.0.attn.to_out.0"]
    twice = _with(path, tmp_path, {"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": down,
                                   "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": up})
    with pytest.raises(LoraError, match=r"holds transformer_blocks\.0\.attn\.to_out\.0 twice: keys .*"
                                        r"lora_unet_double_blocks_0_img_attn_proj\.lora_down\.weight"):
        read_lora(twice, transformer, "flux", strict=False)


def test_quantized_transformer_is_read_by_its_unquantized_layout(flux, monkeypatch):
    """A transformer holding this project's modules (quantized layers, fused blocks): checked against the
    diffusers layout built from its config on the meta device."""
    transformer, path, truth = flux
    model = copy.deepcopy(transformer)
    Fake = type("SVDQW4A4Linear", (torch.nn.Module,), {"__module__": "pipeline.quantization.layers"})
    model.transformer_blocks[0].attn.to_qkv = Fake()  # as the engine installs fused q/k/v
    del model.transformer_blocks[0].attn.to_q
    assert_same(read_lora(path, model, "flux"), truth, FLUX_TARGETS)


QWEN_TARGETS = [
    *[f"transformer_blocks.0.{m}" for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.to_out.0", "attn.to_add_out", "img_mod.1",
        "txt_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")],
    "transformer_blocks.1.attn.to_q", "img_in", "txt_in", "proj_out", "norm_out.linear",
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    transformer = tiny_transformer("tiny-qwen-image")
    tmp = tmp_path_factory.mktemp("qwen")
    path, truth = peft_lora(transformer, tmp, QWEN_TARGETS, r=4, lora_alpha=6, rank_pattern={"img_mod.1": 2})
    return transformer, path, truth


def qwen_file(tmp, truth, fmt):
    t = {}
    for m, (down, up, scaling) in truth.items():
        if fmt == "ai-toolkit":  # diffusion_model. + lora_A/B, no alpha
            t[f"diffusion_model.{m}.lora_A.weight"], t[f"diffusion_model.{m}.lora_B.weight"] = down, up * scaling
            continue
        stem, parts = {"comfyui": (f"diffusion_model.{m}", ("lora_down", "lora_up")),
                       "kohya": ("lora_unet_" + m.replace(".", "_"), ("lora_down", "lora_up")),
                       "peft-default": (m, ("lora_A.default", "lora_B.default"))}[fmt]
        t[f"{stem}.{parts[0]}.weight"], t[f"{stem}.{parts[1]}.weight"] = down, up * scaling * down.shape[0] / ALPHA
        t[f"{stem}.alpha"] = torch.tensor(ALPHA)
    meta = {"software": json.dumps({"name": "ai-toolkit"})} if fmt == "ai-toolkit" else None
    return write(tmp / f"qwen-{fmt}.safetensors", t, meta)


def test_qwen_diffusers_file_made_by_peft(qwen):
    transformer, path, truth = qwen
    w = read_lora(path, transformer, "qwen-image")
    assert (w.format, w.family) == ("diffusers", "qwen-image")
    assert w.layers["transformer_blocks.0.img_mod.1"].scale == 3.0  # lora_alpha 6 / its rank 2
    assert_same(w, truth, QWEN_TARGETS)


@pytest.mark.parametrize("fmt", ["comfyui", "kohya", "peft-default", "ai-toolkit"])
def test_qwen_formats_give_the_same_layers(qwen, tmp_path, fmt):
    transformer, _, truth = qwen
    w = read_lora(qwen_file(tmp_path, truth, fmt), transformer, "qwen-image-edit")
    assert w.format == {"peft-default": "diffusers"}.get(fmt, fmt)
    assert_same(w, truth, QWEN_TARGETS)


def test_z_image_kohya_and_fused_community_formats(tmp_path):
    """Z-Image: kohya names, and the community dot format with a fused qkv, also next to split q/k/v keys (then
    diffusers' converter takes the split ones: the groups that clash are converted together)."""
    transformer = tiny_transformer("tiny-z-image")
    targets = [f"layers.0.attention.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")] + [
        "layers.0.feed_forward.w1", "layers.0.feed_forward.w2", "layers.0.adaLN_modulation.0",
        "noise_refiner.0.attention.to_q", "context_refiner.0.feed_forward.w3"]
    path, truth = peft_lora(transformer, tmp_path, targets, r=4, lora_alpha=4)
    assert_same(read_lora(path, transformer, "z-image"), truth, targets)

    kohya = {}
    for m, (down, up, scaling) in truth.items():
        stem = "lora_unet_" + m.replace(".", "_")
        kohya[f"{stem}.lora_down.weight"], kohya[f"{stem}.lora_up.weight"] = down, up * scaling * 4 / ALPHA
        kohya[f"{stem}.alpha"] = torch.tensor(ALPHA)
    w = read_lora(write(tmp_path / "z-kohya.safetensors", kohya), transformer, "z-image")
    assert (w.format, w.family) == ("kohya", "z-image")
    assert_same(w, truth, targets)

    a = "diffusion_model.layers.0.attention."
    qkv = [f"layers.0.attention.to_{p}" for p in "qkv"]
    dot = {}
    dot[a + "qkv.lora.down.weight"], dot[a + "qkv.lora.up.weight"] = fused(truth, qkv, ALPHA)
    dot[a + "qkv.alpha"] = torch.tensor(ALPHA)
    out = truth["layers.0.attention.to_out.0"]
    dot[a + "out.lora.down.weight"], dot[a + "out.lora.up.weight"] = out[0], out[1] * out[2]
    w = read_lora(write(tmp_path / "z-dot.safetensors", dot), transformer, "z-image")
    assert_same(w, truth, qkv + ["layers.0.attention.to_out.0"])

    for p, m in zip("qkv", qkv):  # Anime-Z style: the split keys too (the fused one is then redundant)
        dot[f"{a}to.{p}.lora.down.weight"], dot[f"{a}to.{p}.lora.up.weight"] = truth[m][0], truth[m][1] * truth[m][2]
    dot[a + "qkv.lora.up.weight"] = dot[a + "qkv.lora.up.weight"] * 7  # would be wrong if it were used
    w = read_lora(write(tmp_path / "z-anime.safetensors", dot), transformer, "z-image")
    assert_same(w, truth, qkv + ["layers.0.attention.to_out.0"])


# ----------------------------------------------------------------------------------------------- errors


def _with(path, tmp, extra):
    """The file at `path` (its metadata too) with `extra` tensors added."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    return write(tmp / "extra.safetensors", {**tensors, **extra}, metadata)


def test_unknown_key_names_the_nearest_layers_and_strict_false_lists_it(flux, tmp_path):
    transformer, path, truth = flux
    bad = {"transformer_blocks.0.attn.to_qq.lora_A.weight": torch.zeros(4, 128),
           "transformer_blocks.0.attn.to_qq.lora_B.weight": torch.zeros(128, 4)}
    extra = _with(path, tmp_path, bad)
    with pytest.raises(LoraError) as e:
        read_lora(extra, transformer, "flux")
    msg = str(e.value)
    assert "transformer_blocks.0.attn.to_qq.lora_A.weight" in msg and "lora.strict=false" in msg
    near = msg.split("nearest layers: ")[1].split("\n")[0].split(", ")
    assert len(near) == 3 and "transformer_blocks.0.attn.to_q" in near
    w = read_lora(extra, transformer, "flux", strict=False)
    assert sorted(w.ignored) == sorted(bad)
    assert_same(w, truth, FLUX_TARGETS)


def test_unknown_kohya_key_and_non_lora_keys(flux, tmp_path):
    transformer, _, truth = flux
    path, modules = flux_file(tmp_path, truth, "kohya")
    bad = {"lora_unet_double_blocks_0_img_attn_qkvx.lora_down.weight": torch.zeros(2, 128),
           "lora_unet_double_blocks_0_img_attn_qkvx.lora_up.weight": torch.zeros(384, 2),
           "lora_unet_double_blocks_0_img_attn_proj.dora_scale": torch.ones(1, 128),
           "lora_unet_double_blocks_7_img_attn_proj.lora_down.weight": torch.zeros(2, 128),  # a block it lacks
           "lora_unet_double_blocks_7_img_attn_proj.lora_up.weight": torch.zeros(128, 2)}
    extra = _with(path, tmp_path, bad)
    with pytest.raises(LoraError) as e:
        read_lora(extra, transformer, "flux")
    msg = str(e.value)
    assert "lora_unet_double_blocks_0_img_attn_qkvx.lora_down.weight" in msg
    assert "DoRA" in msg and "transformer_blocks.7.attn.to_out.0" in msg
    w = read_lora(extra, transformer, "flux", strict=False)
    assert sorted(w.ignored) == sorted(bad)
    assert_same(w, truth, modules)


def test_text_encoder_keys_are_listed_not_applied(flux, tmp_path):
    transformer, _, truth = flux
    path, modules = flux_file(tmp_path, truth, "kohya")
    te = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 64),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(64, 2),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0)}
    w = read_lora(_with(path, tmp_path, te), transformer, "flux")  # strict: not an error
    assert sorted(w.ignored) == sorted(te)
    assert_same(w, truth, modules)


def test_incomplete_and_empty_loras(flux, tmp_path):
    transformer, _, _ = flux
    half = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(2, 128),
            "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(2.0),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 128, 1, 1)}  # a conv LoRA
    with pytest.raises(LoraError) as e:
        read_lora(write(tmp_path / "half.safetensors", half), transformer, "flux")
    assert "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight: has no up matrix" in str(e.value)
    assert "img_attn_qkv.lora_down.weight: not a LoRA matrix" in str(e.value)
    with pytest.raises(LoraError, match="holds no LoRA for this flux transformer"):
        read_lora(tmp_path / "half.safetensors", transformer, "flux", strict=False)
    te = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 64),
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 2)}
    with pytest.raises(LoraError, match="only text-encoder keys"):
        read_lora(write(tmp_path / "te.safetensors", te), transformer, "flux")


def test_lora_for_another_architecture(flux, qwen, tmp_path):
    flux_transformer, _, flux_truth = flux
    qwen_transformer, _, qwen_truth = qwen
    with pytest.raises(LoraError, match="made for a qwen-image transformer.*'flux' has a flux transformer"):
        read_lora(qwen_file(tmp_path, qwen_truth, "kohya"), flux_transformer, "flux")
    path, _ = flux_file(tmp_path, flux_truth, "bfl")
    with pytest.raises(LoraError, match="made for a flux transformer"):
        read_lora(path, qwen_transformer, "qwen-image")
    sdxl = write(tmp_path / "sdxl.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)})
    with pytest.raises(LoraError, match="made for a Stable Diffusion UNet"):
        read_lora(sdxl, flux_transformer, "flux")
    assert made_for(["transformer_blocks.0.attn.to_q.lora_A.weight"]) is None  # FLUX and Qwen-Image share it


def test_lora_for_another_width(flux, tmp_path):
    """FLUX.1-dev LoRAs (3072 wide) on the tiny model (128): refused before anything is applied."""
    transformer, _, _ = flux
    dev = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(1, 3072),
           "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 1)}
    with pytest.raises(LoraError, match=r"in_features 3072 but the model's transformer_blocks\.0\.attn\.to_[qkv] has "
                                        r"128.*made for a flux transformer of another size"):
        read_lora(write(tmp_path / "dev.safetensors", dev), transformer, "flux")
    linear1 = {"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(1, 3072),
               "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(21504, 1)}
    with pytest.raises(LoraError, match=r"in_features 3072 but the model's single_transformer_blocks\.0\.attn\.to_q "
                                        r"has 128"):
        read_lora(write(tmp_path / "dev1.safetensors", linear1), transformer, "flux")
    narrow = {"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(1, 128),
              "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(1000, 1)}
    with pytest.raises(LoraError, match=r"out_features 1000 but .*to_q/to_k/to_v/proj_mlp have 128\+128\+128\+512"):
        read_lora(write(tmp_path / "odd.safetensors", narrow), transformer, "flux")
    diffusers = {"transformer_blocks.0.attn.to_out.0.lora_A.weight": torch.zeros(2, 128),
                 "transformer_blocks.0.attn.to_out.0.lora_B.weight": torch.zeros(3072, 2)}
    with pytest.raises(LoraError, match=r"out_features 3072 but the model's transformer_blocks\.0\.attn\.to_out\.0 "
                                        r"has 128"):
        read_lora(write(tmp_path / "wide.safetensors", diffusers), transformer, "flux")


def test_truncated_corrupt_and_missing_files(flux, tmp_path):
    transformer, path, _ = flux
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraError, match=r"(?s)cut\.safetensors is not a readable safetensors file.*truncated"):
        read_lora(cut, transformer, "flux")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(LoraError, match="junk.safetensors"):
        read_lora(junk, transformer, "flux")
    with pytest.raises(LoraError, match=r"no LoRA file at .*nowhere\.safetensors: check the path"):
        read_lora(tmp_path / "nowhere.safetensors", transformer, "flux")
    with pytest.raises(LoraError, match=r"\(a folder\)"):
        read_lora(tmp_path, transformer, "flux")
