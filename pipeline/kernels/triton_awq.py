"""Triton GEMV for AWQ W4A16 layers (the AdaLN modulation): y = x·(q·s + z)ᵀ + b for a few rows of x.

The modulation input is the timestep embedding, one row per image, so this is a matrix-vector
product bound by reading the weights: reading 4-bit codes (two per byte) instead of a dequantized
16-bit copy is what makes it fast. Per 64-group, Σ x·(q·s + z) = s·Σ x·q + z·Σ x, in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GROUP = 64


@triton.jit
def _awq_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, N, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, G: tl.constexpr):
    pid, m = tl.program_id(0), tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    half = tl.arange(0, G // 2)
    ok = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for g in range(0, K // G):
        wb = tl.load(w_ptr + cols[:, None] * (K // 2) + g * (G // 2) + half[None, :], mask=ok[:, None], other=0)
        wb = wb.to(tl.int32)
        lo, hi = (wb & 0xF).to(tl.float32), ((wb >> 4) & 0xF).to(tl.float32)  # codes 2j and 2j+1
        xe = tl.load(x_ptr + m * K + g * G + 2 * half).to(tl.float32)
        xo = tl.load(x_ptr + m * K + g * G + 2 * half + 1).to(tl.float32)
        dot = tl.sum(lo * xe[None, :] + hi * xo[None, :], axis=1)
        s = tl.load(s_ptr + cols * (K // G) + g, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + cols * (K // G) + g, mask=ok, other=0.0).to(tl.float32)
        acc += s * dot + z * (tl.sum(xe, axis=0) + tl.sum(xo, axis=0))
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * N + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def awq_gemv(x: torch.Tensor, packed: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor, bias,
             block_n: int = 64) -> torch.Tensor:
    """x (M, K) with few rows (dispatch.AWQ_MAX_ROWS), packed codes (N, K/2) uint8, scales/zeros (N, K/64) -> (M, N) in x's dtype."""
    x, packed, wscales, wzeros = (t.contiguous() for t in (x, packed, wscales, wzeros))
    m, k = x.shape
    n = packed.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _awq_gemv_kernel[(triton.cdiv(n, block_n), m)](x, packed, wscales, wzeros, bias if bias is not None else wscales,
                                                   out, n, k, HAS_BIAS=bias is not None, BLOCK_N=block_n, G=GROUP)
    return out
