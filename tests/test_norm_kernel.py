"""AdaLN-Zero's LayerNorm + modulation in one Triton kernel (triton_norm.py, fused_norm.py), against diffusers'
modules: on CPU through Triton's interpreter, on a GPU for real."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle  # noqa: E402

from pipeline.kernels.triton_norm import adaln_modulate  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def assert_matches(got, ref, size):
    """Up to the mean/variance summation order: a few fp32 ulp; in 16 bits one step of the operands' size
    (`size`: |norm(x)·(1 + scale)| + |shift|, as the sum may cancel), rarely."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    if ref.dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        return
    diff = (got.float() - ref.float()).abs()
    step = 2 * size.float().clamp_min(1e-2) * torch.finfo(ref.dtype).eps
    assert bool((diff <= step).all()), float((diff / step).max())
    assert float((got != ref).float().mean()) < 0.01, float((got != ref).float().mean())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,s,n", [(1, 7, 96), (2, 33, 3072)])
def test_adaln_modulation_matches_diffusers_ops(dtype, b, s, n):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(b, s, n, generator=g) * 4 + 1).to(DEVICE, dtype)
    x[:, 0] = 0.5  # a constant row: variance 0, eps alone keeps it finite
    emb = (torch.randn(b, 3 * n, generator=g) * 0.5).to(DEVICE, dtype)
    shift, scale, _ = emb.chunk(3, dim=1)  # row-strided views, as AdaLN-Zero's chunks are
    norm = torch.nn.LayerNorm(n, elementwise_affine=False, eps=1e-6)
    product = norm(x) * (1 + scale[:, None])
    ref = product + shift[:, None]
    assert_matches(adaln_modulate(x, scale, shift, 1e-6), ref, product.abs() + shift[:, None].abs())


@pytest.mark.parametrize("cls,chunks", [(AdaLayerNormZero, 6), (AdaLayerNormZeroSingle, 3)])
def test_fused_adaln_modules_match_diffusers_and_are_diffusers_on_the_reference(monkeypatch, cls, chunks):
    from pipeline.quantization.fused_norm import FUSED_CLASSES, install_fused_norm

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.norm1 = cls(96).to(DEVICE)
    x, temb = torch.randn(2, 9, 96, device=DEVICE), torch.randn(2, 96, device=DEVICE)
    with torch.no_grad():
        ref = holder.norm1(x, emb=temb)
        assert install_fused_norm(holder, "norm1.linear") and type(holder.norm1) is FUSED_CLASSES[cls]
        monkeypatch.setenv("SVDQ_KERNELS", "reference")
        plain = holder.norm1(x, emb=temb)
        monkeypatch.setenv("SVDQ_KERNELS", "triton")
        calls = []
        from pipeline.kernels import triton_norm

        real = triton_norm.adaln_modulate
        monkeypatch.setattr(triton_norm, "adaln_modulate", lambda *a: calls.append(1) or real(*a))
        fused = holder.norm1(x, emb=temb)
    assert len(ref) == chunks - 1 and calls == [1]
    assert all(torch.equal(a, b) for a, b in zip(plain, ref))  # the reference: diffusers' ops, bit for bit
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-5)  # fp32
    assert all(torch.equal(a, b) for a, b in zip(fused[1:], ref[1:]))  # gates, shifts, scales untouched


def test_only_adaln_zero_with_a_plain_layernorm_is_fused():
    from pipeline.quantization.fused_norm import install_fused_norm

    holder = torch.nn.Module()
    holder.a = AdaLayerNormZero(64, num_embeddings=10)  # its own label embedding: left alone
    holder.b = AdaLayerNormZero(64, norm_type="fp32_layer_norm")
    holder.c = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(64, 64))  # Qwen-Image's img_mod
    assert not any(install_fused_norm(holder, p) for p in ("a.linear", "b.linear", "c.1"))
    assert (type(holder.a), type(holder.b)) == (AdaLayerNormZero, AdaLayerNormZero)


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-qwen-image"])
def test_quantized_blocks_run_every_modulated_norm_as_one_kernel_and_match_diffusers(monkeypatch, model):
    """FLUX: norm1 and norm1_context (double blocks) and norm (single blocks) once their modulation is AWQ,
    and the double blocks' norm2 and norm2_context with theirs (fused_block.py); Qwen-Image: each block's four
    norms. One kernel call each where the kernels run, output as with diffusers' ops; the reference is
    unchanged bit for bit."""
    from conftest import fusion_on_and_off

    from pipeline.kernels import triton_norm
    from pipeline.quantization import fused_norm

    transformer, (fused, ref, calls), (plain, plain_ref, plain_calls) = fusion_on_and_off(
        monkeypatch, model, fused_norm, triton_norm, "adaln_modulate")
    norms = 4 * len(transformer.transformer_blocks) + len(getattr(transformer, "single_transformer_blocks", []))
    assert (calls, plain_calls) == (norms, 0)
    assert torch.equal(ref, plain_ref)
    assert (fused.float() - plain.float()).abs().max() / plain.float().abs().max() < 1e-5
