"""LoRAs on tiny SVDQuant transformers (pipeline/lora/apply.py): each kind of layer gets the LoRA's delta, a
quantized model with LoRAs is as close to the 16-bit model with them as quantization allows, and taking them off
(or strength 0) gives the base model back bit for bit."""

from __future__ import annotations

import copy
import functools
import hashlib
import math

import pytest
import torch
from torch import nn

from conftest import run_config
from test_checkpoint import forward
from pipeline.errors import LoraError
from pipeline.lora import LoraLayer, LoraWeights
from pipeline.lora.apply import LOW_RANK_MULTIPLE, apply_loras, lora_report, remove_loras
from pipeline.models.tiny import build_tiny
from pipeline.quantization import SVDQuantConfig, quantize_
from pipeline.quantization.calibration import CalibrationSettings, collect_stats
from pipeline.quantization.layers import AWQW4A16Linear, SVDQW4A4Linear
from pipeline.quantization.targets import targets_for

# Every kind of module a LoRA reaches: q/k/v of both streams (fused), output projections, MLP fc1/fc2 (fc2 with the
# unsigned activations' shift), FLUX's single-block proj_mlp and split proj_out, the AdaLN modulations (AWQ), and
# the layers that stay 16-bit (embedders, norm_out, proj_out).
PATHS = {
    "tiny-flux": [
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
        "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.to_out.0",
        "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
        "transformer_blocks.1.ff_context.net.2", "transformer_blocks.0.norm1.linear",
        "transformer_blocks.1.norm1_context.linear", "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp",
        "single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out",
        "single_transformer_blocks.1.norm.linear", "x_embedder", "context_embedder", "norm_out.linear", "proj_out",
        "time_text_embed.timestep_embedder.linear_1"],
    "tiny-qwen-image": [
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
        "transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.add_v_proj",
        "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out",
        "transformer_blocks.0.img_mlp.net.0.proj", "transformer_blocks.0.img_mlp.net.2",
        "transformer_blocks.1.txt_mlp.net.2", "transformer_blocks.0.img_mod.1", "transformer_blocks.1.txt_mod.1",
        "img_in", "txt_in", "norm_out.linear", "proj_out"],
}
FAMILY = {"tiny-flux": "flux", "tiny-qwen-image": "qwen-image"}


def pipe16(model: str, *overrides: str):
    pipe = build_tiny(run_config([f"model={model}", *overrides]).model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quantize(pipe, precision: str):
    """test_checkpoint.quantized_pipe's calibration and quantization, on a pipe given (a LoRA merged, say)."""
    stats = collect_stats(pipe, targets_for(pipe.transformer),
                          CalibrationSettings(prompts=["a dog", "a red house"], steps=2, height=64, width=64,
                                              max_sequence_length=32))
    quantize_(pipe.transformer, SVDQuantConfig(precision, 32, True, [0.5]), stats)
    return pipe


@functools.cache
def quantized(model: str, precision: str = "int4", sliced: bool = False) -> nn.Module:
    """A quantized tiny transformer, built once (tests take their LoRAs off again: remove is exact)."""
    from pipeline.quantization import fused_qkv

    enabled = fused_qkv.ENABLED
    fused_qkv.ENABLED = not sliced
    try:
        return quantize(pipe16(model), precision).transformer
    finally:
        fused_qkv.ENABLED = enabled


@functools.cache
def base16(model: str) -> nn.Module:
    return pipe16(model).transformer


def make_lora(model: str, seed: int, paths=None, size: float = 0.5, name: str = "") -> LoraWeights:
    """Random LoRA layers (ranks 3..5, alpha/rank 0.5) whose delta is `size` x the 16-bit weight's norm."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i, path in enumerate(paths or PATHS[model]):
        w = base16(model).get_submodule(path).weight.detach().float()
        rank = 3 + i % 3
        down, up = torch.randn(rank, w.shape[1], generator=g), torch.randn(w.shape[0], rank, generator=g)
        up *= size * w.norm() / (0.5 * up @ down).norm()
        layers[path] = LoraLayer(down, up, 0.5)
    name = name or f"lora{seed}"
    return LoraWeights(name, f"/loras/{name}.safetensors", hashlib.sha256(name.encode()).hexdigest(), "diffusers",
                       FAMILY[model], layers)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def psnr(y: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float((y.float() - ref.float()).pow(2).mean())
    return 10 * math.log10(float(ref.float().abs().max()) ** 2 / mse) if mse > 0 else math.inf


def snapshot(transformer: nn.Module) -> dict:
    """Every tensor the transformer holds, as (dtype, device, bytes copy)."""
    return {k: t.detach().clone() for k, t in transformer.state_dict(keep_vars=True).items()}


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def off():
    """Transformers a test put LoRAs on: taken off again however the test ends (the cached ones are shared)."""
    used = []
    yield used.append
    for t in used:
        remove_loras(t)


# ---------- each kind of layer gets the LoRA's delta (the conventions: smoothing, shift, rows, halves) ----------

def expected_delta(model: str, lora: LoraWeights, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """The full-width delta W of each module the quantized model runs, keyed by its path there: a fused q/k/v
    layer's thirds (q, k, v), a split proj_out as the whole."""
    fused = {"to_q": ("to_qkv", 0), "to_k": ("to_qkv", 1), "to_v": ("to_qkv", 2), "add_q_proj": ("to_added_qkv", 0),
             "add_k_proj": ("to_added_qkv", 1), "add_v_proj": ("to_added_qkv", 2)}
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora.layers.items():
        delta = strength * layer.scale * layer.up @ layer.down
        owner, _, leaf = path.rpartition(".")
        if leaf in fused:
            name, i = fused[leaf]
            key = f"{owner}.{name}"
            full = out.setdefault(key, torch.zeros(3 * delta.shape[0], delta.shape[1]))
            full[i * delta.shape[0] : (i + 1) * delta.shape[0]] += delta
        else:
            out[path] = out.get(path, 0) + delta
    return out


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-qwen-image"])
def test_every_kind_of_layer_gets_the_loras_delta_on_its_original_input(model, off):
    """Per module: output with the LoRA - output without = x·ΔWᵀ, for random x (any sign: fc2's input shift must
    cancel for every input), up to the 16-bit rounding of the LoRA's factors in the low-rank branch. A LoRA down
    scaled by the smoothing factor, a shift left in, a wrong third of q/k/v or a half of proj_out would be off by
    O(1). The AWQ modulation with its LoRA stays as close to the 16-bit linear with the LoRA merged as it is without
    it (its rows are in diffusers' order)."""
    q, lora = quantized(model), make_lora(model, 1)
    g = torch.Generator().manual_seed(2)
    deltas = expected_delta(model, lora, 0.8)
    xs = {path: torch.randn(6, q.get_submodule(path).in_features, generator=g) for path in deltas}
    with torch.no_grad():
        before = {path: q.get_submodule(path)(x) for path, x in xs.items()}
        off(q)
        apply_loras(q, [(lora, 0.8)])
        after = {path: q.get_submodule(path)(x) for path, x in xs.items()}
    kinds = set()
    for path, delta in deltas.items():
        module = q.get_submodule(path)
        kinds.add(type(module).__name__ + ("+shift" if getattr(module, "act_shift", 0) else ""))
        got, want = after[path] - before[path], xs[path] @ delta.T
        err = rel_error(got, want)
        tol = 1e-5 if isinstance(module, nn.Linear) else 1e-2  # merged in fp32 | factors held in bf16
        assert err < tol, f"{path} ({type(module).__name__}): delta off by {err:.2e} (PSNR {psnr(got, want):.1f} dB)"
        if isinstance(module, AWQW4A16Linear):
            with torch.no_grad():
                ref = base16(model).get_submodule(path)(xs[path])
            ref_lora = ref + xs[path] @ delta.T
            e0, e1 = rel_error(before[path], ref), rel_error(after[path], ref_lora)
            assert e1 <= 1.5 * e0 + 1e-3, f"{path}: AWQ + LoRA vs 16-bit + LoRA {e1:.2e}, without LoRA {e0:.2e}"
    assert {"SVDQW4A4Linear", "SVDQW4A4Linear+shift", "AWQW4A16Linear", "Linear"} <= kinds
    if model == "tiny-flux":
        assert "SplitInputLinear" in kinds


# ---------- the whole model: quantized + LoRA vs 16-bit + LoRA ----------

@pytest.mark.parametrize("model,precision", [("tiny-flux", "int4"), ("tiny-qwen-image", "int4"),
                                             ("tiny-flux", "nvfp4")])
def test_quantized_model_with_loras_is_as_close_to_the_16bit_model_with_them_as_quantization_allows(model, precision,
                                                                                                    off):
    a, b = make_lora(model, 1), make_lora(model, 2, PATHS[model][::2], size=0.3)
    loras = [(a, 1.0), (b, -0.7)]
    ref = base16(model)
    y16 = forward(ref, model)
    off(ref)
    apply_loras(ref, loras)
    y16_lora = forward(ref, model)
    remove_loras(ref)
    q = quantized(model, precision)
    yq = forward(q, model)
    off(q)
    apply_loras(q, loras)
    yq_lora = forward(q, model)
    merged = pipe16(model)
    apply_loras(merged.transformer, loras, reversible=False)  # merged into the 16-bit weights, then quantized
    y_merged_q = forward(quantize(merged, precision).transformer, model)

    quant, with_lora, merged_first = (rel_error(yq, y16), rel_error(yq_lora, y16_lora),
                                      rel_error(y_merged_q, y16_lora))
    effect = rel_error(y16_lora, y16)
    msg = (f"{model} {precision}: rel. error vs 16-bit: quantized {quant:.4f} ({psnr(yq, y16):.1f} dB), quantized + "
           f"LoRAs vs 16-bit + LoRAs {with_lora:.4f} ({psnr(yq_lora, y16_lora):.1f} dB), quantize(16-bit + LoRAs) "
           f"{merged_first:.4f} ({psnr(y_merged_q, y16_lora):.1f} dB); the LoRAs change the 16-bit output by "
           f"{effect:.3f}")
    assert effect > 5 * with_lora, msg  # the LoRAs matter more than what quantization loses
    assert with_lora <= 1.5 * quant + 0.002, msg
    assert with_lora <= 1.5 * merged_first + 0.002, msg


def test_16bit_model_merges_like_diffusers_and_takes_them_off_exactly(off):
    """An unquantized transformer: every LoRA layer is a plain merge, W + (up·down)·scale·strength in fp32 (what
    diffusers' fuse_lora computes), and remove puts the very same weights back."""
    model = "tiny-flux"
    t, lora = base16(model), make_lora(model, 3)
    before, y = snapshot(t), forward(t, model)
    off(t)
    report = apply_loras(t, [(lora, 0.6)])
    for path, layer in lora.layers.items():
        w = before[f"{path}.weight"]
        want = w + (layer.up @ layer.down) * (layer.scale * 0.6)
        got = t.get_submodule(path).weight
        assert torch.allclose(got, want, rtol=0, atol=1e-6), path
        assert report["modules"][path]["how"] == "merged"
    manual = copy.deepcopy(t)
    remove_loras(manual)
    assert same_tensors(snapshot(manual), before)  # the copy's originals came along
    with torch.no_grad():
        for path, layer in lora.layers.items():
            manual.get_submodule(path).weight += (layer.up @ layer.down) * (layer.scale * 0.6)
    assert torch.allclose(forward(t, model), forward(manual, model), rtol=0, atol=1e-6)
    remove_loras(t)
    assert same_tensors(snapshot(t), before) and torch.equal(forward(t, model), y)


# ---------- exact removal, strength 0, order ----------

def test_strength_zero_and_remove_give_the_base_model_back_bit_for_bit(off):
    model = "tiny-flux"
    q = quantized(model)
    a, b = make_lora(model, 1), make_lora(model, 2, PATHS[model][1::2])
    before, y = snapshot(q), forward(q, model)
    codes = {n: m.packed_codes for n, m in q.named_modules() if isinstance(m, SVDQW4A4Linear)}
    off(q)
    report = apply_loras(q, [(a, 0.0)])
    assert torch.equal(forward(q, model), y) and same_tensors(snapshot(q), before)
    assert report["loras"] == [] and report["left_out"][0]["name"] == a.name and report["modules"] == {}
    apply_loras(q, [])
    assert torch.equal(forward(q, model), y) and lora_report(q)["modules"] == {}
    for loras in ([(a, 1.0)], [(b, 0.5), (a, 0.0)], [(a, -1.0), (b, 2.0)]):  # each replaces the last
        apply_loras(q, loras)
        assert not torch.equal(forward(q, model), y)
        assert all(m.packed_codes is codes[n] for n, m in q.named_modules() if n in codes)  # 4-bit untouched
    remove_loras(q)
    assert torch.equal(forward(q, model), y) and same_tensors(snapshot(q), before)
    assert lora_report(q) == {} and all(not m._forward_hooks for m in q.modules() if isinstance(m, AWQW4A16Linear))
    apply_loras(q, [(a, 1.0)])
    apply_loras(q, [(a, 0.0), (b, 0.0)])
    assert torch.equal(forward(q, model), y) and same_tensors(snapshot(q), before)


def test_two_loras_compose_and_their_order_changes_no_bit(off):
    model = "tiny-qwen-image"
    q = quantized(model)
    a, b = make_lora(model, 1), make_lora(model, 2, PATHS[model][:9])
    off(q)
    apply_loras(q, [(a, 0.7), (b, -0.4)])
    ab = forward(q, model)
    report = lora_report(q)
    apply_loras(q, [(b, -0.4), (a, 0.7)])
    assert torch.equal(forward(q, model), ab)
    assert lora_report(q) == report
    assert [entry["name"] for entry in report["loras"]] == [w.name for w in sorted((a, b), key=lambda w: w.sha256)]
    # both deltas land: one module's change is the sum of each LoRA's
    path = "transformer_blocks.0.attn.to_qkv"
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(4))
    want = x @ (expected_delta(model, a, 0.7)[path] + expected_delta(model, b, -0.4)[path]).T
    layer = q.get_submodule(path)
    with torch.no_grad():
        got = layer(x)
        remove_loras(q)
        got = got - layer(x)
    assert rel_error(got, want) < 1e-2


def test_row_slices_share_the_new_down_and_match_the_fused_layer_bit_for_bit(off):
    """q/k/v held as three row slices sharing one proj_down (fusion off): the slices keep sharing one extended
    proj_down, each has its rows of the new up columns, and the model computes what the fused layer does."""
    model = "tiny-flux"
    sliced, fused = quantized(model, sliced=True), quantized(model)
    lora = make_lora(model, 1, ["transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_q",
                                "single_transformer_blocks.1.attn.to_v", "transformer_blocks.1.attn.add_q_proj"])
    attn = sliced.transformer_blocks[0].attn
    down = attn.to_q.proj_down
    assert attn.to_k.proj_down is down and isinstance(attn.to_q, SVDQW4A4Linear)
    before, y = snapshot(sliced), forward(sliced, model)
    assert torch.equal(y, forward(fused, model))
    off(sliced)
    off(fused)
    report = apply_loras(sliced, [(lora, 1.0)])
    apply_loras(fused, [(lora, 1.0)])
    assert attn.to_q.proj_down is attn.to_k.proj_down is attn.to_v.proj_down
    assert attn.to_q.proj_down.shape[1] == attn.to_q.rank == 48  # 32 + 3 + 4, padded to a multiple of 16
    assert torch.equal(attn.to_v.proj_up[:, 32:], torch.zeros_like(attn.to_v.proj_up[:, 32:]))  # no LoRA on v
    assert report["modules"]["transformer_blocks.0.attn.to_v"]["loras"] == []
    assert torch.equal(forward(sliced, model), forward(fused, model))
    remove_loras(sliced)
    assert attn.to_q.proj_down is down and attn.to_v.proj_down is down
    assert same_tensors(snapshot(sliced), before) and torch.equal(forward(sliced, model), y)


def test_report_and_rank_padding(off):
    model = "tiny-flux"
    q = quantized(model)
    lora = make_lora(model, 1)
    off(q)
    report = apply_loras(q, [(lora, 1.0)])
    modules = report["modules"]
    qkv = modules["transformer_blocks.0.attn.to_qkv"]
    assert qkv["how"] == "low-rank" and qkv["lora_rank"] == 3 + 4 + 5 and qkv["rank"] == 16
    assert modules["single_transformer_blocks.0.proj_out.first"]["loras"] == [lora.name]
    assert modules["single_transformer_blocks.0.proj_out.second"]["lora_rank"] == lora.layers[
        "single_transformer_blocks.0.proj_out"].rank
    assert modules["transformer_blocks.0.norm1.linear"]["how"] == "side-branch"
    assert modules["x_embedder"]["how"] == "merged"
    for m in q.modules():
        if isinstance(m, SVDQW4A4Linear):
            assert m.proj_down.shape[1] % LOW_RANK_MULTIPLE == 0 and m.proj_up.shape[1] == m.rank
    assert report["loras"] == [{"name": lora.name, "sha256": lora.sha256, "strength": 1.0,
                                "layers": len(PATHS[model])}]
    assert report["rank_added"] == sum(entry["rank"] for entry in modules.values())


def test_bad_loras_are_refused_before_anything_changes(off):
    model = "tiny-qwen-image"
    q = quantized(model)
    good = make_lora(model, 1)
    before = snapshot(q)
    off(q)
    apply_loras(q, [(good, 1.0)])
    with_good = forward(q, model)
    unknown = LoraWeights("x", "/x", "0" * 64, "diffusers", "flux",
                          {"single_transformer_blocks.0.proj_out": LoraLayer(torch.zeros(2, 640), torch.zeros(128, 2))})
    wrong = LoraWeights("y", "/y", "1" * 64, "diffusers", "qwen-image",
                        {"transformer_blocks.0.attn.to_k": LoraLayer(torch.zeros(2, 64), torch.zeros(128, 2))})
    with pytest.raises(LoraError, match="no such module"):
        apply_loras(q, [(unknown, 1.0)])
    with pytest.raises(LoraError, match="do not fit"):
        apply_loras(q, [(wrong, 1.0)])
    assert torch.equal(forward(q, model), with_good)  # the set it held is still on
    remove_loras(q)
    assert same_tensors(snapshot(q), before)


# ---------- the kernels' path ----------

@pytest.mark.parametrize("path", ["transformer_blocks.0.ff.net.2", "transformer_blocks.0.attn.to_qkv"])
def test_kernels_run_the_extended_branch_as_the_reference_does(monkeypatch, off, path):
    """The Triton kernels (the interpreter on CPU) on a layer whose rank grew by a LoRA (padded to 48) give its
    reference_forward; fc2 also through the fused MLP (its down in fc1's epilogue)."""
    from pipeline.kernels.dispatch import kernel_mode
    from pipeline.quantization.fused_mlp import gelu_mlp

    model = "tiny-flux"
    q = quantized(model)
    off(q)
    apply_loras(q, [(make_lora(model, 1), 1.0)])
    layer = q.get_submodule(path)
    assert layer.rank == 48
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        monkeypatch.setenv("SVDQ_KERNELS", "triton")
    layer = copy.deepcopy(layer).to(device)
    x = torch.randn(2, 12, layer.in_features, generator=torch.Generator().manual_seed(5)).to(device)
    assert kernel_mode(x.device, "int4") in ("fp8", "int8")
    with torch.no_grad():
        y, ref = layer(x), layer.reference_forward(x)
        assert rel_error(y, ref) < 1e-4, f"kernels vs reference: {rel_error(y, ref):.2e}"
        if path.endswith("ff.net.2"):
            fc1 = copy.deepcopy(q.get_submodule("transformer_blocks.0.ff.net.0.proj")).to(device)
            h = torch.randn(2, 12, fc1.in_features, generator=torch.Generator().manual_seed(6)).to(device)
            fused = gelu_mlp(h, fc1, layer)
            want = layer.reference_forward(torch.nn.functional.gelu(fc1.reference_forward(h), approximate="tanh"))
            assert rel_error(fused, want) < 1e-3, f"fused MLP vs reference: {rel_error(fused, want):.2e}"
