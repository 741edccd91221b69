"""A double block's text and image q/k/v written by their GEMMs straight into one joint tensor
(svdq::w4a4_linear_joint), so the attention reads v without a concatenation: on CPU through Triton's
interpreter, on a GPU for real."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_kernels import DEVICE, hold_in, make_layer  # noqa: E402

from pipeline.kernels import ops  # noqa: E402
from pipeline.kernels.triton_w4a4 import quantize_act, w4a4_gemm  # noqa: E402


def _streams(dtype, batch=2, text=5, image=7, k=128, n=64):
    """Two INT4 layers of one width (text, image) and their inputs (B, S, K) on DEVICE."""
    layers, xs = [], []
    for seed, tokens in ((1, text), (2, image)):
        layer, x = make_layer(batch * tokens, k, n, 16, False, seed=seed)
        hold_in(dtype, layer)
        layers.append(layer.to(DEVICE))
        xs.append(x.to(DEVICE, dtype).reshape(batch, tokens, k))
    return layers, xs


def _gemm(layer, x, **kw):
    codes, scales, low = quantize_act(x.reshape(-1, x.shape[-1]), layer.smooth, layer.proj_down, 0.0, False,
                                      codes="fp8")
    return w4a4_gemm(codes, scales, layer.packed_codes, layer.wscales, low, layer.proj_up, layer.bias, x.dtype, "fp8",
                     **kw)


@pytest.mark.parametrize("batch", [1, 2])
def test_gemm_writes_each_images_rows_into_its_slice_of_a_joint_tensor(batch):
    """Each stream's GEMM writes image b's rows at b's place in the joint tensor: exactly torch.cat of the two
    outputs, every row written once, nothing outside its slice touched."""
    dtype = torch.float16
    (lt, li), (xt, xi) = _streams(dtype, batch)
    text, image = xt.shape[1], xi.shape[1]
    expected = torch.cat([_gemm(lt, xt).reshape(batch, text, -1), _gemm(li, xi).reshape(batch, image, -1)], dim=1)
    joint = torch.full_like(expected, float("nan"))
    assert _gemm(lt, xt, out=joint[:, :text]).data_ptr() == joint.data_ptr()
    assert torch.isnan(joint[:, text:]).all()  # the text GEMM stayed in its slice
    _gemm(li, xi, out=joint[:, text:])
    assert torch.equal(joint, expected)


def test_gemm_refuses_an_out_whose_rows_are_not_contiguous_or_the_wrong_size():
    (lt, _), (xt, _) = _streams(torch.float32)
    joint = torch.empty(2, 12, 64, device=DEVICE)
    for bad in (joint[:, :4], joint[:, :5, :32], joint.transpose(0, 1)[:5], joint[:, :5].half()):
        with pytest.raises(ValueError, match="out of shape"):
            _gemm(lt, xt, out=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_joint_op_is_torch_cat_of_the_two_layers_bit_for_bit(dtype, monkeypatch):
    layers, xs = _streams(dtype)
    if DEVICE.type == "cpu":
        monkeypatch.setenv("SVDQ_KERNELS", "triton")
    got = ops.w4a4_linear_joint(xs, [m.packed_codes for m in layers], [m.wscales for m in layers],
                                [m.smooth for m in layers], [m.proj_down for m in layers],
                                [m.proj_up for m in layers], [m.bias for m in layers], [0.0, 0.0], [False, False],
                                "fp8")
    separate = [ops.w4a4_linear(x.reshape(-1, x.shape[-1]), m.packed_codes, m.wscales, m.smooth, m.proj_down,
                                m.proj_up, m.bias, None, None, 0.0, False, "fp8").reshape(*x.shape[:2], -1)
                for m, x in zip(layers, xs)]
    assert got.shape == (2, 12, 64) and torch.equal(got, torch.cat(separate, dim=1))


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-qwen-image"])
def test_double_blocks_project_both_streams_into_one_tensor_and_match_the_separate_projections(monkeypatch, model):
    """With the kernels on, each double block's attention runs one joint projection (FLUX's single blocks have a
    single stream already); the transformer's output is bit for bit the one with separate projections and
    torch.cat, and the reference path never takes it."""
    from conftest import ONE_BLOCK_EACH, kernels_then_reference
    from test_checkpoint import quantized_pipe

    from pipeline.quantization import fused_attention

    transformer = quantized_pipe(model, "int4", *ONE_BLOCK_EACH).transformer
    joint, ref, calls = kernels_then_reference(monkeypatch, transformer, model, ops, "w4a4_linear_joint")
    assert calls == len(transformer.transformer_blocks)
    monkeypatch.setattr(fused_attention, "joint_projections", lambda attn, hidden, context: None)
    separate, ref2, calls = kernels_then_reference(monkeypatch, transformer, model, ops, "w4a4_linear_joint")
    assert calls == 0 and torch.equal(ref, ref2)
    assert torch.equal(joint, separate)
