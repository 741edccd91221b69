"""AdaLN-Zero's gated residual sums (`residual + gate · branch`) in the GEMM epilogue (triton_w4a4.py) and the
FLUX blocks that use it (fused_block.py, fused_mlp.py): on CPU through Triton's interpreter, on a GPU for real."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_kernels import DEVICE, DTYPES, hold_in, make_layer  # noqa: E402

from pipeline.kernels.triton_w4a4 import act_code_format, quantize_act, w4a4_gemm  # noqa: E402
from pipeline.quantization.layers import gated  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("images,tokens", [(1, 37), (2, 19)])
def test_gated_epilogue_is_diffusers_gated_sum_of_the_gemm_output_bit_for_bit(dtype, images, tokens):
    """The same GEMM rounded to the dtype, then gate · y and + residual, each rounded as torch rounds them:
    the epilogue gives exactly diffusers' `residual + gate.unsqueeze(1) * y`, per image's gate row."""
    layer, x = make_layer(images * tokens, 192, 96, 16, False, seed=3)
    hold_in(dtype, layer)
    x = x.to(dtype)
    g = torch.Generator().manual_seed(4)
    gate = (torch.randn(images, 96, generator=g) * 0.7).to(DEVICE, dtype)
    residual = (torch.randn(images * tokens, 96, generator=g) * 3).to(DEVICE, dtype)
    dot = "fp8"
    codes, scales, low = quantize_act(x, layer.smooth, layer.proj_down, 0.0, False, codes=act_code_format(dot))
    args = (codes, scales, layer.packed_codes, layer.wscales, low, layer.proj_up, layer.bias, dtype, dot, False)
    y = w4a4_gemm(*args)
    want = gated(y.reshape(images, tokens, 96), gate, residual.reshape(images, tokens, 96)).reshape(-1, 96)
    got = w4a4_gemm(*args, gate=gate, gated_residual=residual)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="gate and gated_residual go together"):
        w4a4_gemm(*args, gate=gate)
    with pytest.raises(ValueError, match=r"gate of shape \(3, 96\) is not one row of 96 per image"):
        w4a4_gemm(*args, gate=torch.zeros(3, 96, dtype=dtype, device=DEVICE), gated_residual=residual)


def test_layer_gated_forward_matches_its_reference(monkeypatch):
    layer, x = make_layer(2 * 11, 128, 64, 16, False, seed=5)
    x = x.reshape(2, 11, 128)
    g = torch.Generator().manual_seed(6)
    gate = torch.randn(2, 64, generator=g).to(DEVICE)
    residual = torch.randn(2, 11, 64, generator=g).to(DEVICE)
    ref = layer(x, gate=gate, gated_residual=residual)
    assert torch.equal(ref, residual + gate.unsqueeze(1) * layer(x))  # the reference: diffusers' ops
    if DEVICE.type == "cpu":
        monkeypatch.setenv("SVDQ_KERNELS", "triton")
    got = layer(x, gate=gate, gated_residual=residual)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-4


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-qwen-image"])
def test_blocks_compute_every_gated_sum_in_a_gemm_epilogue_and_match_diffusers(monkeypatch, model):
    """Per double block: to_out, to_add_out and both MLPs' fc2 (4); per FLUX single block: proj_out's second
    half. The output matches diffusers' blocks on the same kernels; the reference is diffusers' ops bit for bit."""
    from conftest import fusion_on_and_off

    from pipeline.kernels import triton_w4a4
    from pipeline.quantization import fused_block

    transformer, (fused, ref, calls), (plain, plain_ref, plain_calls) = fusion_on_and_off(
        monkeypatch, model, fused_block, triton_w4a4, "w4a4_gemm", when=lambda a: a.get("gate") is not None)
    from pipeline.quantization.architecture import architecture_of

    blocks = architecture_of(transformer).fusions().blocks
    assert all(type(b) in blocks.values() for b in transformer.transformer_blocks)
    sums = 4 * len(transformer.transformer_blocks) + len(getattr(transformer, "single_transformer_blocks", []))
    assert (calls, plain_calls) == (sums, 0)
    assert torch.equal(ref, plain_ref)
    assert (fused.float() - plain.float()).abs().max() / plain.float().abs().max() < 1e-5
