"""Triton kernel for attention's q/k preparation: per-head RMSNorm, rotary embedding and the text+image
concatenation in one pass.

diffusers runs these as separate PyTorch ops: the norm, then RoPE as `x.float()`, a negation, a stack,
two fp32 multiplies, an add and a cast back, then `torch.cat` of the text and image streams. In eager
mode that is about 94 GB of memory traffic per FLUX.1-dev forward at 1024² (benchmarks/eager_traffic.py),
more than every GEMM's. Here each q/k element is read once and written once, into the joint
(B, S_text + S_image, H, D) tensor the attention reads.

The arithmetic is diffusers': sum of squares and rsqrt in fp32; the normed value rounded to 16 bits
(diffusers' own RMSNorm rounds again before its weight; torch.nn.RMSNorm rounds once, after it), then
rotated in fp32 as out[2j] = x[2j]·cos[2j] - x[2j+1]·sin[2j], out[2j+1] = x[2j+1]·cos[2j+1] + x[2j]·sin[2j+1]
(FLUX's real form and Qwen-Image's complex product alike), rounded once to 16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl


NUM_WARPS = 4


def heads_per_program(heads: int, head_dim: int) -> int:
    """Heads one program normalises and rotates: up to 4096 elements (32 per thread with 4 warps)."""
    return min(triton.next_power_of_2(heads), max(1, 4096 // head_dim))


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, stride_b, stride_s, wq_ptr, wk_ptr, cos_ptr, sin_ptr, tab_stride_s,
                         tab_stride_j, tab_row0, oq_ptr, ok_ptr, out_stride_b, out_stride_s, out_row0, S, H, eps,
                         D: tl.constexpr, BLOCK_H: tl.constexpr, HAS_W: tl.constexpr, ROUND_NORMED: tl.constexpr,
                         PAIRED: tl.constexpr):
    """One token (program 0), BLOCK_H heads (program 1), q or k (program 2) of one stream."""
    pid = tl.program_id(0)
    b, s = pid // S, pid % S
    if tl.program_id(2) == 0:
        x_ptr, w_ptr, o_ptr = q_ptr, wq_ptr, oq_ptr
    else:
        x_ptr, w_ptr, o_ptr = k_ptr, wk_ptr, ok_ptr
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    half = tl.arange(0, D // 2)
    ok = (heads < H)[:, None]
    src = x_ptr + b.to(tl.int64) * stride_b + s.to(tl.int64) * stride_s + heads[:, None] * D + 2 * half[None, :]
    xe = tl.load(src, mask=ok, other=0.0).to(tl.float32)  # x[2j]
    xo = tl.load(src + 1, mask=ok, other=0.0).to(tl.float32)  # x[2j+1]
    dtype = o_ptr.dtype.element_ty
    r = tl.math.rsqrt((tl.sum(xe * xe, axis=1) + tl.sum(xo * xo, axis=1)) / D + eps)[:, None]
    ye, yo = xe * r, xo * r
    if HAS_W:
        if ROUND_NORMED:  # diffusers' RMSNorm: to 16 bits, then times the 16-bit weight
            ye, yo = ye.to(dtype).to(tl.float32), yo.to(dtype).to(tl.float32)
        ye = ye * tl.load(w_ptr + 2 * half).to(tl.float32)[None, :]
        yo = yo * tl.load(w_ptr + 2 * half + 1).to(tl.float32)[None, :]
    ye, yo = ye.to(dtype).to(tl.float32), yo.to(dtype).to(tl.float32)  # the norm's 16-bit output
    tab = (tab_row0 + s).to(tl.int64) * tab_stride_s
    if PAIRED:  # one (cos, sin) per pair: Qwen-Image's complex frequencies
        ce = tl.load(cos_ptr + tab + half * tab_stride_j).to(tl.float32)
        se = tl.load(sin_ptr + tab + half * tab_stride_j).to(tl.float32)
        co, so = ce, se
    else:  # one per element: FLUX's repeat-interleaved cos and sin
        ce = tl.load(cos_ptr + tab + 2 * half * tab_stride_j).to(tl.float32)
        co = tl.load(cos_ptr + tab + (2 * half + 1) * tab_stride_j).to(tl.float32)
        se = tl.load(sin_ptr + tab + 2 * half * tab_stride_j).to(tl.float32)
        so = tl.load(sin_ptr + tab + (2 * half + 1) * tab_stride_j).to(tl.float32)
    oe = ye * ce[None, :] - yo * se[None, :]
    oo = yo * co[None, :] + ye * so[None, :]
    dst = (o_ptr + b.to(tl.int64) * out_stride_b + (out_row0 + s).to(tl.int64) * out_stride_s + heads[:, None] * D
           + 2 * half[None, :])
    tl.store(dst, oe.to(dtype), mask=ok)
    tl.store(dst + 1, oo.to(dtype), mask=ok)


@dataclass
class Stream:
    """One stream's q and k (B, S, H, D), views of its projection's output, with their norms' weights."""

    q: torch.Tensor
    k: torch.Tensor
    wq: Optional[torch.Tensor]
    wk: Optional[torch.Tensor]


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel reads it: heads packed (stride D) and elements contiguous; rows and batch strided."""
    d = x.shape[-1]
    return x if x.stride(-1) == 1 and x.stride(-2) == d else x.contiguous()


def qk_norm_rope(streams: list[Stream], cos: list[torch.Tensor], sin: list[torch.Tensor], eps: float,
                 round_normed: bool, paired: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(q), RMSNorm(k), both rotated, streams concatenated on the sequence: two (B, ΣS, H, D) tensors.

    cos/sin: one table per stream (rows from that stream's first token: Qwen-Image), or one table over the
    joint sequence (FLUX). paired: tables hold one value per pair (S, D/2) instead of one per element (S, D).
    """
    if len(cos) not in (1, len(streams)) or len(sin) != len(cos):
        raise ValueError(f"need one cos/sin table, or one per stream ({len(streams)}); got {len(cos)}/{len(sin)}")
    first = streams[0].q
    b, _, h, d = first.shape
    total = sum(st.q.shape[1] for st in streams)
    out_q = torch.empty(b, total, h, d, dtype=first.dtype, device=first.device)
    out_k = torch.empty_like(out_q)
    block_h = heads_per_program(h, d)
    row0 = 0
    for i, st in enumerate(streams):
        q, k = _rows_view(st.q), _rows_view(st.k)
        if k.stride() != q.stride():
            q, k = q.contiguous(), k.contiguous()
        c, s_ = (cos[i], sin[i]) if len(cos) > 1 else (cos[0], sin[0])
        if c.stride() != s_.stride():
            c, s_ = c.contiguous(), s_.contiguous()
        seq = q.shape[1]
        weight = st.wq if st.wq is not None else q
        grid = (b * seq, triton.cdiv(h, block_h), 2)
        _qk_norm_rope_kernel[grid](
            q, k, q.stride(0), q.stride(1), weight, st.wk if st.wk is not None else weight, c, s_, c.stride(0),
            c.stride(1), 0 if len(cos) > 1 else row0, out_q, out_k, out_q.stride(0), out_q.stride(1), row0, seq, h,
            eps, D=d, BLOCK_H=block_h, HAS_W=st.wq is not None, ROUND_NORMED=round_normed, PAIRED=paired,
            num_warps=NUM_WARPS)
        row0 += seq
    return out_q, out_k
