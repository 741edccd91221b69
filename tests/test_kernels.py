"""Triton W4A4 kernels against the PyTorch reference: on CPU through Triton's interpreter, on GPU for real.

The interpreter rounds fp32->bf16 by truncation (GPUs round to nearest even), so CPU checks use
fp32 and fp16, where both are exact; bf16 is checked on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
pytest.importorskip("triton")

from pipeline.kernels.dispatch import kernel_mode  # noqa: E402
from pipeline.kernels.triton_w4a4 import quantize_act, w4a4_gemm  # noqa: E402
from pipeline.quantization import numerics as nx  # noqa: E402
from pipeline.quantization.quantizer import ActStats, svdquant_linear  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def make_layer(m, k, n, rank, unsigned, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 3] *= 30  # an outlier channel
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    w, b = torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, generator=g)
    layer, _ = svdquant_linear(w, b, ActStats(x.abs().amax(0), x), precision="int4", rank=rank,
                               act_unsigned=unsigned, alphas=(0.5,))
    return layer.to(DEVICE), x.to(DEVICE)


SHAPES = [(1, 128, 32, 16), (17, 128, 96, 32), (40, 256, 160, 0), (33, 384, 64, 48)]


@pytest.mark.parametrize("m,k,n,rank", SHAPES)
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_kernel_matches_reference_exactly(m, k, n, rank, unsigned, dtype):
    layer, x = make_layer(m, k, n, rank, unsigned)
    x = x.to(dtype)
    shifted = x + layer.act_shift if layer.act_shift else x
    codes, scales, low = quantize_act(x, layer.smooth, layer.proj_down, layer.act_shift, unsigned, block_m=16)
    ref_codes, ref_scales = nx.quantize_act(shifted / layer.smooth.to(dtype), "int4", unsigned)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    assert torch.allclose(low, shifted.float() @ layer.proj_down.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m,k,n,rank", SHAPES)
@pytest.mark.parametrize("use_fp8", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_kernel_matches_reference(m, k, n, rank, use_fp8, dtype):
    layer, x = make_layer(m, k, n, rank, unsigned=True)
    x = x.to(dtype)
    codes, scales, low = quantize_act(x, layer.smooth, layer.proj_down, layer.act_shift, True, block_m=16)
    y = w4a4_gemm(codes, scales, layer.qweight, layer.wscales, low, layer.proj_up, layer.bias, dtype, use_fp8,
                  block_m=16, block_n=32)
    ref = layer.reference_forward(x)
    assert y.dtype == dtype and y.shape == (m, n)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]  # fp32 accumulation order + output rounding
    assert ((y.float() - ref.float()).abs().max() / ref.float().abs().max()) < tol


def test_layer_dispatches_to_the_kernels_and_compiles_without_graph_breaks(monkeypatch):
    layer, x = make_layer(24, 128, 64, 16, unsigned=False)
    if DEVICE.type == "cpu":
        monkeypatch.setenv("SVDQ_KERNELS", "triton")
    assert kernel_mode(x.device, "int4") in ("fp8", "int8")
    y = layer(x.reshape(2, 12, 128))
    assert y.shape == (2, 12, 64)
    assert torch.allclose(y.reshape(24, 64), layer.reference_forward(x), rtol=1e-4, atol=1e-4)
    explain = torch._dynamo.explain(layer)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    monkeypatch.setenv("SVDQ_KERNELS", "reference")
    assert kernel_mode(x.device, "int4") == "reference" and kernel_mode(x.device, "nvfp4") == "reference"
    explain = torch._dynamo.explain(layer)(x)
    assert explain.graph_break_count == 0, explain.break_reasons


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_pipeline_on_gpu_matches_the_reference_path(tmp_path, monkeypatch):
    from conftest import run_config
    from pipeline.runner import psnr, run_job

    overrides = ["job.limit=2", "job.progress=none", "sampler.device=cuda", "sampler.dtype=bfloat16"]
    run_job(run_config(overrides), tmp_path / "kernels")
    monkeypatch.setenv("SVDQ_KERNELS", "reference")
    run_job(run_config(overrides), tmp_path / "reference")
    from PIL import Image

    for name in ("cat_0.png", "lighthouse_42.png"):
        assert psnr(Image.open(tmp_path / "kernels" / name), Image.open(tmp_path / "reference" / name)) > 35
