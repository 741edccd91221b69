"""q/k RMSNorm + RoPE + stream concatenation in one Triton kernel (triton_rope.py, fused_attention.py), against
diffusers' own ops: on CPU through Triton's interpreter, on a GPU for real."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from diffusers.models.normalization import RMSNorm  # noqa: E402
from diffusers.models.transformers.transformer_flux import FluxPosEmbed  # noqa: E402
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope, apply_rotary_emb_qwen  # noqa: E402
from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402

from pipeline.kernels.triton_rope import Stream, qk_norm_rope  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def projected(b, seq, heads, d, dtype, g):
    """q, k, v as diffusers gets them from a fused projection: (B, S, H, D) views with row stride 3·H·D."""
    x = torch.randn(b, seq, 3 * heads * d, generator=g) * 3
    x[:, 0] *= 3e-4  # a token whose mean square is near eps: eps must be where diffusers adds it
    x = x.to(DEVICE, dtype)
    return [c.unflatten(-1, (heads, d)) for c in x.chunk(3, dim=-1)]


def norms(kind, d, dtype, g, affine=True):
    out = []
    for _ in range(4):
        n = (torch.nn.RMSNorm(d, eps=1e-6, elementwise_affine=affine) if kind == "torch"
             else RMSNorm(d, eps=1e-6, elementwise_affine=affine))
        if affine:
            with torch.no_grad():
                n.weight.copy_(torch.rand(d, generator=g) + 0.5)
        out.append(n.to(DEVICE, dtype))
    return out


def assert_matches(got, ref):
    """Exact up to fp32 summation order: in fp32 a few ulp; in 16 bits at most one step, and rarely."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    if ref.dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)
        return
    # one 16-bit step of the normed input (a sum-order tie) moves a rotated pair by that step of its size
    diff = (got.float() - ref.float()).abs()
    pair = ref.float().unflatten(-1, (-1, 2)).abs().amax(-1, keepdim=True).expand(*ref.shape[:-1], -1, 2)
    step = 2 * pair.flatten(-2).clamp_min(1e-3) * torch.finfo(ref.dtype).eps
    assert bool((diff <= step).all()), float((diff / step).max())
    assert float((got != ref).float().mean()) < 0.01, float((got != ref).float().mean())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,txt,img,heads,d", [(1, 5, 12, 3, 64), (2, 7, 16, 40, 128)])
def test_flux_streams_match_diffusers_norm_rope_and_cat(dtype, b, txt, img, heads, d):
    """FLUX: torch.nn.RMSNorm per stream, cat (text first), apply_rotary_emb over the joint sequence."""
    g = torch.Generator().manual_seed(0)
    (tq, tk, _), (iq, ik, _) = projected(b, txt, heads, d, dtype, g), projected(b, img, heads, d, dtype, g)
    nq, nk, naq, nak = norms("torch", d, dtype, g)
    side = 4
    ids = torch.cat([torch.zeros(txt, 3), torch.stack([torch.zeros(img), torch.arange(img) // side,
                                                       torch.arange(img) % side], dim=1)])
    axes = [d // 8, 3 * d // 8, d // 2]
    cos, sin = (t.to(DEVICE) for t in FluxPosEmbed(theta=10000, axes_dim=axes)(ids))
    with torch.no_grad():
        ref_q = apply_rotary_emb(torch.cat([naq(tq), nq(iq)], dim=1), (cos, sin), sequence_dim=1)
        ref_k = apply_rotary_emb(torch.cat([nak(tk), nk(ik)], dim=1), (cos, sin), sequence_dim=1)
        q, k = qk_norm_rope([Stream(tq, tk, naq.weight, nak.weight), Stream(iq, ik, nq.weight, nk.weight)],
                            [cos], [sin], 1e-6, round_normed=False, paired=False)
    assert_matches(q, ref_q)
    assert_matches(k, ref_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_qwen_streams_match_diffusers_norm_complex_rope_and_cat(dtype, affine):
    """Qwen-Image: diffusers' RMSNorm (rounds before its weight), a complex RoPE table per stream, cat."""
    g = torch.Generator().manual_seed(1)
    b, txt, heads, d, frame = 2, 6, 3, 64, (1, 3, 4)
    (tq, tk, _), (iq, ik, _) = projected(b, txt, heads, d, dtype, g), projected(b, 12, heads, d, dtype, g)
    nq, nk, naq, nak = norms("diffusers", d, dtype, g, affine)
    img_f, txt_f = QwenEmbedRope(theta=10000, axes_dim=[8, 28, 28], scale_rope=True)(
        [frame], device=DEVICE, max_txt_seq_len=txt)
    with torch.no_grad():
        ref_q = torch.cat([apply_rotary_emb_qwen(naq(tq), txt_f, use_real=False),
                           apply_rotary_emb_qwen(nq(iq), img_f, use_real=False)], dim=1)
        ref_k = torch.cat([apply_rotary_emb_qwen(nak(tk), txt_f, use_real=False),
                           apply_rotary_emb_qwen(nk(ik), img_f, use_real=False)], dim=1)
        tables = [torch.view_as_real(f) for f in (txt_f, img_f)]
        q, k = qk_norm_rope([Stream(tq, tk, naq.weight, nak.weight), Stream(iq, ik, nq.weight, nk.weight)],
                            [t[..., 0] for t in tables], [t[..., 1] for t in tables], 1e-6, round_normed=True,
                            paired=True)
    assert_matches(q, ref_q)
    assert_matches(k, ref_k)


def test_norm_kinds_the_kernel_does_not_reproduce_run_diffusers_code():
    from pipeline.quantization.fused_attention import norm_args

    g = torch.Generator().manual_seed(0)
    flux, qwen = norms("torch", 64, torch.float32, g), norms("diffusers", 64, torch.float32, g)
    assert norm_args(tuple(flux), torch.float32, 64) == (1e-6, False)
    assert norm_args(tuple(qwen), torch.float32, 64) == (1e-6, True)
    assert norm_args(tuple(flux[:2] + qwen[:2]), torch.float32, 64) is None  # two kinds
    assert norm_args(tuple(flux), torch.float16, 64) is None  # weights in another dtype than q/k
    assert norm_args(tuple(flux), torch.float32, 32) is None  # not per head
    other_eps = norms("torch", 64, torch.float32, g)
    other_eps[0].eps = 1e-5
    assert norm_args(tuple(other_eps), torch.float32, 64) is None
    assert norm_args((torch.nn.LayerNorm(64),) * 4, torch.float32, 64) is None
    default_eps = [torch.nn.RMSNorm(64) for _ in range(2)]  # eps None: torch uses the dtype's
    assert norm_args(tuple(default_eps), torch.float16, 64) is None  # fp32 weights
    assert norm_args(tuple(default_eps), torch.float32, 64) == (torch.finfo(torch.float32).eps, False)


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-qwen-image"])
def test_quantized_attention_prepares_q_and_k_in_one_kernel_and_matches_diffusers(monkeypatch, model):
    """Every attention of a quantized transformer runs the kernel once (q and k, both streams) where the
    kernels run; the output matches diffusers' processors on the same kernels, and with the reference
    (no kernels) the fused processors are diffusers' code, bit for bit."""
    from conftest import fusion_on_and_off

    from pipeline.kernels import triton_rope
    from pipeline.quantization import fused_attention

    fused_model, (fused, ref, calls), (plain, plain_ref, plain_calls) = fusion_on_and_off(
        monkeypatch, model, fused_attention, triton_rope, "qk_norm_rope")
    attentions = len(fused_model.transformer_blocks) + len(getattr(fused_model, "single_transformer_blocks", []))
    assert (calls, plain_calls) == (attentions, 0)
    assert torch.equal(ref, plain_ref)
    assert (fused.float() - plain.float()).abs().max() / plain.float().abs().max() < 1e-5
