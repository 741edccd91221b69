"""The Triton W4A4 linear as a torch custom op: opaque to torch.compile, so no graph breaks."""

from __future__ import annotations

from typing import Optional

import torch


@torch.library.custom_op("svdq::w4a4_linear", mutates_args=())
def w4a4_linear(x: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, smooth: torch.Tensor,
                proj_down: torch.Tensor, proj_up: torch.Tensor, bias: Optional[torch.Tensor], shift: float,
                unsigned: bool, use_fp8: bool) -> torch.Tensor:
    """x (M, K) -> (M, N) in x's dtype; INT4 SVDQuant layer via the two Triton kernels."""
    from pipeline.kernels.triton_w4a4 import quantize_act, w4a4_gemm

    codes, scales, low = quantize_act(x, smooth, proj_down, shift, unsigned)
    return w4a4_gemm(codes, scales, qweight, wscales, low, proj_up, bias, x.dtype, use_fp8)


@w4a4_linear.register_fake
def _(x, qweight, wscales, smooth, proj_down, proj_up, bias, shift, unsigned, use_fp8):
    return x.new_empty(x.shape[0], qweight.shape[0])
