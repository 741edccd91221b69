"""Triton kernels for the INT4 SVDQuant layer: fused activation quantization and the W4A4 GEMM.

1. `quantize_act`: one pass over x computes x̂ = (x + shift) / smooth, per-token 64-group scales
   and codes (signed or unsigned), and the low-rank down projection x·proj_down (fp32).
2. `w4a4_gemm`: per 64-wide K group, an exact 4-bit dot product on tensor cores (FP8 e4m3 on
   Hopper and newer: every INT4 code is exact in e4m3; INT8 on Ampere/Ada), scaled by s_a·s_w and
   accumulated in fp32 in K order, like the reference; the epilogue adds bias and the low-rank up
   projection and writes the output dtype.

Both match pipeline/quantization/numerics.py up to fp32 rounding of the scale multiply-adds.
K and R are compile-time constants (a model has few distinct values; it also keeps Triton's CPU
interpreter working with NumPy 2.4, which refuses int() of the 1-element arrays it passes).
The tile sizes here are a correct starting point, not tuned: tuning needs a GPU (see the benchmark).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GROUP = 64


@triton.jit
def _round_half_even(q):
    """torch.round's rounding (ties to even), without libdevice so the interpreter runs it too."""
    r = tl.floor(q + 0.5)
    tie = (r - q) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _quantize_act_kernel(x_ptr, smooth_ptr, down_ptr, codes_ptr, scales_ptr, low_ptr, M, K: tl.constexpr,
                         R: tl.constexpr, shift,
                         UNSIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                         G: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, G)
    rr = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    low = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, G):
        g = k0 // G
        k = k0 + cols
        x = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=row_ok[:, None], other=0.0)
        x = (x.to(tl.float32) + shift).to(x.dtype)  # as torch adds a Python float: fp32 math, rounded
        down = tl.load(down_ptr + k[:, None] * R + rr[None, :], mask=rr[None, :] < R, other=0.0)
        low += tl.dot(x.to(tl.float32), down.to(tl.float32), input_precision="ieee")
        sm = tl.load(smooth_ptr + k).to(x.dtype).to(tl.float32)
        xs = tl.math.div_rn(x.to(tl.float32), sm[None, :]).to(x.dtype)
        qmax = 15.0 if UNSIGNED else 7.0
        scale = tl.math.div_rn(tl.max(tl.abs(xs), axis=1).to(tl.float32), qmax).to(x.dtype)
        inv = tl.where(scale > 0, tl.math.div_rn(1.0, scale.to(tl.float32)), 0.0)
        q = _round_half_even(xs.to(tl.float32) * inv[:, None])
        lo = 0.0 if UNSIGNED else -8.0
        q = tl.minimum(tl.maximum(q, lo), qmax)
        tl.store(codes_ptr + rows[:, None] * K + k[None, :], q.to(tl.int8), mask=row_ok[:, None])
        tl.store(scales_ptr + rows * (K // G) + g, scale, mask=row_ok)
    tl.store(low_ptr + rows[:, None] * R + rr[None, :], low, mask=row_ok[:, None] & (rr[None, :] < R))


@triton.jit
def _w4a4_gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, low_ptr, up_ptr, bias_ptr, out_ptr, M, N, K: tl.constexpr,
                      R: tl.constexpr,
                      HAS_BIAS: tl.constexpr, USE_FP8: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, G: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, G)
    row_ok, col_ok = rows < M, cols < N
    groups = K // G
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, G):
        g = k0 // G
        k = k0 + kk
        a = tl.load(a_ptr + rows[:, None] * K + k[None, :], mask=row_ok[:, None], other=0)
        w = tl.load(w_ptr + cols[None, :] * K + k[:, None], mask=col_ok[None, :], other=0)
        if USE_FP8:
            part = tl.dot(a.to(tl.float16).to(tl.float8e4nv), w.to(tl.float16).to(tl.float8e4nv), out_dtype=tl.float32)
        else:
            part = tl.dot(a, w, out_dtype=tl.int32).to(tl.float32)
        sa = tl.load(as_ptr + rows * groups + g, mask=row_ok, other=0.0).to(tl.float32)
        sw = tl.load(ws_ptr + cols * groups + g, mask=col_ok, other=0.0).to(tl.float32)
        acc += part * (sa[:, None] * sw[None, :])
    rr = tl.arange(0, BLOCK_R)
    low = tl.load(low_ptr + rows[:, None] * R + rr[None, :], mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)
    up = tl.load(up_ptr + cols[None, :] * R + rr[:, None], mask=col_ok[None, :] & (rr[:, None] < R), other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc += tl.dot(low, up.to(tl.float32), input_precision="ieee")
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(max(n, 1)))


def quantize_act(x: torch.Tensor, smooth: torch.Tensor, proj_down: torch.Tensor, shift: float, unsigned: bool,
                 block_m: int = 32):
    """(M, K) -> int8 codes (M, K), scales (M, K/64) in x's dtype, x·proj_down (M, R) fp32."""
    x, smooth, proj_down = x.contiguous(), smooth.contiguous(), proj_down.contiguous()
    m, k = x.shape
    r = proj_down.shape[1]
    codes = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scales = torch.empty(m, k // GROUP, dtype=x.dtype, device=x.device)
    low = torch.empty(m, r, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m),)
    _quantize_act_kernel[grid](x, smooth, proj_down, codes, scales, low, m, k, r, float(shift), UNSIGNED=unsigned,
                               BLOCK_M=block_m, BLOCK_R=_pow2(r), G=GROUP)
    return codes, scales, low


def w4a4_gemm(a_codes, a_scales, w_codes, w_scales, low, proj_up, bias, out_dtype, use_fp8: bool,
              block_m: int = 64, block_n: int = 64):
    """Σ_g dot_g · s_a · s_w (fp32, K order) + bias + low·proj_upᵀ -> (M, N) in out_dtype."""
    a_codes, a_scales, w_codes, w_scales, low, proj_up = (
        t.contiguous() for t in (a_codes, a_scales, w_codes, w_scales, low, proj_up))
    m, k = a_codes.shape
    n = w_codes.shape[0]
    r = proj_up.shape[1]
    out = torch.empty(m, n, dtype=out_dtype, device=a_codes.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w4a4_gemm_kernel[grid](a_codes, a_scales, w_codes, w_scales, low, proj_up,
                            bias if bias is not None else w_scales, out, m, n, k, r,
                            HAS_BIAS=bias is not None, USE_FP8=use_fp8, BLOCK_M=block_m, BLOCK_N=block_n,
                            BLOCK_R=_pow2(r), G=GROUP)
    return out
