"""The Triton W4A4 linear as a torch custom op: opaque to torch.compile, so no graph breaks."""

from __future__ import annotations

from typing import Optional

import torch


def _linear(x, packed_codes, wscales, smooth, proj_down, proj_up, bias, wtscale, wcscales, shift, unsigned, dot,
            residual=None, gate=None, gated_residual=None, out=None):
    """An SVDQuant layer as the activation kernel then the GEMM (x (M, K) -> (M, N), or into `out`)."""
    from pipeline.kernels.triton_w4a4 import act_code_format, quantize_act, w4a4_gemm

    precision = "nvfp4" if dot == "fp16" else "int4"
    codes, scales, low = quantize_act(x, smooth, proj_down, shift, unsigned, precision, codes=act_code_format(dot))
    return w4a4_gemm(codes, scales, packed_codes, wscales, low, proj_up, bias, x.dtype, dot, unsigned, wtscale,
                     wcscales, residual, gate, gated_residual, out=out)


@torch.library.custom_op("svdq::w4a4_linear", mutates_args=())
def w4a4_linear(x: torch.Tensor, packed_codes: torch.Tensor, wscales: torch.Tensor, smooth: torch.Tensor,
                proj_down: torch.Tensor, proj_up: torch.Tensor, bias: Optional[torch.Tensor],
                wtscale: Optional[torch.Tensor], wcscales: Optional[torch.Tensor], shift: float, unsigned: bool,
                dot: str, residual: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                gated_residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (M, K) -> (M, N) in x's dtype [+ residual (M, N)] [then gated_residual (M, N) + gate (B, N) · that]: an
    SVDQuant layer via the two Triton kernels.

    dot "fp8" | "int8" runs INT4, "fp16" runs NVFP4 (emulated); see pipeline/kernels/dispatch.py.
    x may be a column slice of a wider tensor: it is read in place.
    """
    return _linear(x, packed_codes, wscales, smooth, proj_down, proj_up, bias, wtscale, wcscales, shift, unsigned,
                   dot, residual, gate, gated_residual)


@w4a4_linear.register_fake
def _(x, packed_codes, wscales, smooth, proj_down, proj_up, bias, wtscale, wcscales, shift, unsigned, dot,
      residual=None, gate=None, gated_residual=None):
    return x.new_empty(x.shape[0], packed_codes.shape[0])


@torch.library.custom_op("svdq::w4a4_linear_joint", mutates_args=())
def w4a4_linear_joint(xs: list[torch.Tensor], packed_codes: list[torch.Tensor], wscales: list[torch.Tensor],
                      smooth: list[torch.Tensor], proj_down: list[torch.Tensor], proj_up: list[torch.Tensor],
                      bias: list[Optional[torch.Tensor]], shift: list[float], unsigned: list[bool],
                      dot: str) -> torch.Tensor:
    """Streams xs[i] (B, S_i, K_i), each through its own INT4 layer (N outputs each), -> (B, ΣS_i, N): the outputs
    joined along the tokens as torch.cat(dim=1) would join them, each GEMM writing its rows in place (the text and
    image q/k/v of a joint attention, whose v the attention then reads without a concatenation). dot "fp8" | "int8"."""
    batch, n = xs[0].shape[0], packed_codes[0].shape[0]
    joint = xs[0].new_empty(batch, sum(x.shape[1] for x in xs), n)
    start = 0
    for i, x in enumerate(xs):
        _linear(x.reshape(-1, x.shape[-1]), packed_codes[i], wscales[i], smooth[i], proj_down[i], proj_up[i], bias[i],
                None, None, shift[i], unsigned[i], dot, out=joint[:, start:start + x.shape[1]])
        start += x.shape[1]
    return joint


@w4a4_linear_joint.register_fake
def _(xs, packed_codes, wscales, smooth, proj_down, proj_up, bias, shift, unsigned, dot):
    return xs[0].new_empty(xs[0].shape[0], sum(x.shape[1] for x in xs), packed_codes[0].shape[0])


@torch.library.custom_op("svdq::w4a4_gelu_quant", mutates_args=())
def w4a4_gelu_quant(x: torch.Tensor, packed_codes: torch.Tensor, wscales: torch.Tensor, smooth: torch.Tensor,
                    proj_down: torch.Tensor, proj_up: torch.Tensor, bias: Optional[torch.Tensor], shift: float,
                    unsigned: bool, next_smooth: torch.Tensor, next_down: torch.Tensor, next_shift: float,
                    next_unsigned: bool, dot: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) -> the next INT4 layer's quantized input for gelu(layer(x)): codes (M, N) one per byte in
    the dot's type, scales group-major (N/64, M) in x's dtype, low-rank down (M, R') fp32. The (M, N)
    16-bit activation between the two layers is never written. dot "fp8" | "int8"."""
    from pipeline.kernels.triton_w4a4 import quantize_act, w4a4_gemm_gelu_quant

    codes, scales, low = quantize_act(x, smooth, proj_down, shift, unsigned, codes=dot)
    next_codes, next_scales, next_low = w4a4_gemm_gelu_quant(
        codes, scales, packed_codes, wscales, low, proj_up, bias, x.dtype, dot, unsigned, next_smooth, next_down,
        next_shift, next_unsigned)
    return next_codes, next_scales.t(), next_low  # scales as the kernel wrote them: no copy


@w4a4_gelu_quant.register_fake
def _(x, packed_codes, wscales, smooth, proj_down, proj_up, bias, shift, unsigned, next_smooth, next_down,
      next_shift, next_unsigned, dot):
    from pipeline.kernels.triton_w4a4 import CODE_FORMATS, INT4_GROUP

    m, n = x.shape[0], packed_codes.shape[0]
    return (x.new_empty(m, n, dtype=CODE_FORMATS[dot][1]), x.new_empty(n // INT4_GROUP, m),
            x.new_empty(m, next_down.shape[1], dtype=torch.float32))


@torch.library.custom_op("svdq::w4a4_gemm", mutates_args=())
def w4a4_gemm(codes: torch.Tensor, scales: torch.Tensor, packed_codes: torch.Tensor, wscales: torch.Tensor,
              low: torch.Tensor, proj_up: torch.Tensor, bias: Optional[torch.Tensor], unsigned: bool, dot: str,
              residual: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
              gated_residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """An INT4 layer on an input quantized already (w4a4_gelu_quant's outputs) -> (M, N) in the scales' dtype
    [+ residual] [then gated_residual + gate · that]."""
    from pipeline.kernels.triton_w4a4 import w4a4_gemm as gemm

    return gemm(codes, scales.t(), packed_codes, wscales, low, proj_up, bias, scales.dtype, dot, unsigned,
                residual=residual, gate=gate, gated_residual=gated_residual)


@w4a4_gemm.register_fake
def _(codes, scales, packed_codes, wscales, low, proj_up, bias, unsigned, dot, residual=None, gate=None,
      gated_residual=None):
    return codes.new_empty(codes.shape[0], packed_codes.shape[0], dtype=scales.dtype)


@torch.library.custom_op("svdq::awq_w4a16_gemv", mutates_args=())
def awq_w4a16_gemv(x: torch.Tensor, packed_codes: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (M, K), M small -> (M, N) in x's dtype: an AWQ W4A16 layer via the Triton GEMV."""
    from pipeline.kernels.triton_awq import awq_gemv

    return awq_gemv(x, packed_codes, wscales, wzeros, bias)


@awq_w4a16_gemv.register_fake
def _(x, packed_codes, wscales, wzeros, bias):
    return x.new_empty(x.shape[0], packed_codes.shape[0])


@torch.library.custom_op("svdq::qk_norm_rope", mutates_args=())
def qk_norm_rope(qs: list[torch.Tensor], ks: list[torch.Tensor], wqs: list[Optional[torch.Tensor]],
                 wks: list[Optional[torch.Tensor]], cos: list[torch.Tensor], sin: list[torch.Tensor], eps: float,
                 round_normed: bool, paired: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per stream (text, image) q and k (B, S, H, D) -> RMSNorm'd, rotated, concatenated q and k (B, ΣS, H, D)
    in one pass (triton_rope.py). cos/sin: one table over the joint sequence, or one per stream."""
    from pipeline.kernels.triton_rope import Stream
    from pipeline.kernels.triton_rope import qk_norm_rope as kernel

    return kernel([Stream(*t) for t in zip(qs, ks, wqs, wks)], list(cos), list(sin), eps, round_normed, paired)


@qk_norm_rope.register_fake
def _(qs, ks, wqs, wks, cos, sin, eps, round_normed, paired):
    b, _, h, d = qs[0].shape
    shape = (b, sum(q.shape[1] for q in qs), h, d)
    return qs[0].new_empty(shape), qs[0].new_empty(shape)


@torch.library.custom_op("svdq::adaln_modulate", mutates_args=())
def adaln_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """x (B, S, N) -> LayerNorm(x)·(1 + scale) + shift in one pass (triton_norm.py); scale, shift (B, N)."""
    from pipeline.kernels.triton_norm import adaln_modulate as kernel

    return kernel(x, scale, shift, eps)


@adaln_modulate.register_fake
def _(x, scale, shift, eps):
    return x.new_empty(x.shape)
