"""The Triton W4A4 linear as a torch custom op: opaque to torch.compile, so no graph breaks."""

from __future__ import annotations

from typing import Optional

import torch


@torch.library.custom_op("svdq::w4a4_linear", mutates_args=())
def w4a4_linear(x: torch.Tensor, packed_codes: torch.Tensor, wscales: torch.Tensor, smooth: torch.Tensor,
                proj_down: torch.Tensor, proj_up: torch.Tensor, bias: Optional[torch.Tensor],
                wtscale: Optional[torch.Tensor], wcscales: Optional[torch.Tensor], shift: float, unsigned: bool,
                dot: str, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (M, K) -> (M, N) in x's dtype [+ residual (M, N)]: an SVDQuant layer via the two Triton kernels.

    dot "fp8" | "int8" runs INT4, "fp16" runs NVFP4 (emulated); see pipeline/kernels/dispatch.py.
    x may be a column slice of a wider tensor: it is read in place.
    """
    from pipeline.kernels.triton_w4a4 import act_code_format, quantize_act, w4a4_gemm

    precision = "nvfp4" if dot == "fp16" else "int4"
    codes, scales, low = quantize_act(x, smooth, proj_down, shift, unsigned, precision, codes=act_code_format(dot))
    return w4a4_gemm(codes, scales, packed_codes, wscales, low, proj_up, bias, x.dtype, dot, unsigned, wtscale,
                     wcscales, residual)


@w4a4_linear.register_fake
def _(x, packed_codes, wscales, smooth, proj_down, proj_up, bias, wtscale, wcscales, shift, unsigned, dot,
      residual=None):
    return x.new_empty(x.shape[0], packed_codes.shape[0])


@torch.library.custom_op("svdq::awq_w4a16_gemv", mutates_args=())
def awq_w4a16_gemv(x: torch.Tensor, packed_codes: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (M, K), M small -> (M, N) in x's dtype: an AWQ W4A16 layer via the Triton GEMV."""
    from pipeline.kernels.triton_awq import awq_gemv

    return awq_gemv(x, packed_codes, wscales, wzeros, bias)


@awq_w4a16_gemv.register_fake
def _(x, packed_codes, wscales, wzeros, bias):
    return x.new_empty(x.shape[0], packed_codes.shape[0])
