"""Triton kernel for AdaLN-Zero's normalisation: LayerNorm (no affine) then x·(1 + scale) + shift, one pass.

diffusers' AdaLayerNormZero / AdaLayerNormZeroSingle run `norm(x) * (1 + scale) + shift` as three eager
passes over the (tokens x dim) activations (the norm, the product, the sum); here x is read once and the
modulated result written once. The roundings are diffusers': the norm's output, 1 + scale, the product
and the sum are each rounded to the activations' dtype (fp32 math in between).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _adaln_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, S, N, stride_xb, stride_xs, stride_mod, eps,
                  BLOCK: tl.constexpr):
    """One token's row (program 0): mean and variance in fp32 over the row held in registers."""
    pid = tl.program_id(0)
    b, s = pid // S, pid % S
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(x_ptr + b.to(tl.int64) * stride_xb + s.to(tl.int64) * stride_xs + cols, mask=ok,
                other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    centred = tl.where(ok, x - mean, 0.0)
    rstd = tl.math.rsqrt(tl.sum(centred * centred, axis=0) / N + eps)
    dtype = out_ptr.dtype.element_ty
    normed = (centred * rstd).to(dtype).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_mod + cols, mask=ok, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + b * stride_mod + cols, mask=ok, other=0.0).to(tl.float32)
    product = (normed * (1.0 + scale).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    tl.store(out_ptr + pid.to(tl.int64) * N + cols, (product + shift).to(dtype), mask=ok)


def launch_shape(n: int) -> tuple[int, int]:
    """(BLOCK, warps) for rows of n: the whole row in one program, at most 16 elements per thread."""
    block = triton.next_power_of_2(n)
    return block, max(1, min(8, block // 1024))


def adaln_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """x (B, S, N); scale, shift (B, N) (chunks of the modulation output: row-strided views are read in
    place) -> LayerNorm(x)·(1 + scale) + shift, (B, S, N) contiguous in x's dtype."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if scale.stride(-1) != 1 or shift.stride() != scale.stride():
        scale, shift = scale.contiguous(), shift.contiguous()
    b, s, n = x.shape
    out = torch.empty(b, s, n, dtype=x.dtype, device=x.device)
    block, warps = launch_shape(n)
    _adaln_kernel[(b * s,)](x, scale, shift, out, s, n, x.stride(0), x.stride(1), scale.stride(0), eps,
                            BLOCK=block, num_warps=warps)
    return out
