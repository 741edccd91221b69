"""Triton kernels for the SVDQuant W4A4 layer: fused activation quantization and the W4A4 GEMM.

1. `quantize_act`: one pass over x computes x̂ = (x + shift) / smooth, per-token group scales and
   4-bit codes (INT4 signed or unsigned, 64-groups; or NVFP4: E2M1 codes, 16-groups, E4M3 scales),
   and the low-rank down projection x·proj_down (fp32). INT4 codes for the GEMM are written one per
   byte in the dot's type (FP8 or INT8), so they reach the tensor cores unconverted; NVFP4 codes (and
   INT4 on request) two per byte. Scales are written group-major.
2. `w4a4_gemm`: per K group, an exact 4-bit dot product on tensor cores, scaled by s_a·s_w and
   accumulated in fp32 in K order, like the reference; the epilogue applies NVFP4's weight tensor and
   channel scales, adds bias and the low-rank up projection, and writes the output dtype.
   Dot types: "fp8" (e4m3; every INT4 code is exact in it; Ada/Hopper/Blackwell), "int8"
   (Turing/Ampere), "fp16" (NVFP4 emulation: E2M1 values are exact in fp16; no native FP4 is used).

Weight codes are packed as numerics.pack_nibbles does (byte j = codes 2j, 2j+1). INT4 groups are
split into their even and odd codes, two chained K=32 dots with no shuffle; NVFP4 groups (16 codes)
are re-interleaved (tl.interleave), since a K=8 dot does not exist. Packed INT4 codes become FP8 by
bit operations (inline PTX on a GPU, the same arithmetic in Triton ops in the interpreter), never
by int-to-float conversions, which run at a quarter rate. benchmarks/kernel_static.py reports what
each tile config compiles to.

Both kernels match pipeline/quantization/numerics.py up to fp32 rounding of the scale multiply-adds.
K and R are compile-time constants (a model has few distinct values; it also keeps Triton's CPU
interpreter working with NumPy 2.4, which refuses int() of the 1-element arrays it passes).
Tiles are autotuned on a GPU (`GEMM_CONFIGS`); the interpreter uses the fixed small tiles given.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

INT4_GROUP, NVFP4_GROUP = 64, 16
DOTS = {"fp8": 0, "int8": 1, "fp16": 2}


# ---------- number formats, in arithmetic the interpreter and the GPU agree on ----------

@triton.jit
def _round_half_even(q):
    """torch.round's rounding (ties to even), without libdevice so the interpreter runs it too."""
    r = tl.floor(q + 0.5)
    tie = (r - q) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _e4m3_round(v):
    """Nearest FP8 E4M3 value of 0 <= v <= 448 (ties to even), as fp32: torch's .to(float8_e4m3fn)."""
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)  # below 2^-6 E4M3 is subnormal: fixed step 2^-9
    quantum = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return _round_half_even(v / quantum) * quantum


@triton.jit
def _e4m3_decode(bits):
    """E4M3 bit patterns (uint8, no NaNs expected) -> fp32."""
    b = bits.to(tl.int32)
    exp = (b >> 3) & 0xF
    man = (b & 7).to(tl.float32)
    pow2 = ((tl.maximum(exp, 1) - 7 + 127) << 23).to(tl.float32, bitcast=True)
    mag = tl.where(exp == 0, man * 0.125, 1.0 + man * 0.125) * pow2
    return tl.where((b & 0x80) != 0, -mag, mag)


@triton.jit
def _e2m1_encode(v):
    """fp32 -> E2M1 code (sign << 3 | index of {0, .5, 1, 1.5, 2, 3, 4, 6}), nearest, ties to even."""
    a = tl.minimum(tl.abs(v), 6.0)
    step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
    m = _round_half_even(a / step) * step
    idx = tl.where(m < 2.0, m * 2.0, tl.where(m < 4.0, m + 2.0, m * 0.5 + 4.0)).to(tl.int32)
    return idx | tl.where((v < 0) & (idx > 0), 8, 0)


@triton.jit
def _e2m1_decode(code):
    mag = code & 7
    val = tl.where(mag < 4, mag.to(tl.float32) * 0.5,
                   tl.where(mag < 6, (mag - 2).to(tl.float32), ((mag - 4) * 2).to(tl.float32)))
    return tl.where((code & 8) != 0, -val, val)


@triton.jit
def _nibbles(packed, SIGNED: tl.constexpr):
    """uint8 (R, C) -> (codes 2j, codes 2j+1) as int32 (R, C), sign-extended if SIGNED."""
    b = packed.to(tl.int32)
    lo, hi = b & 0xF, (b >> 4) & 0xF
    if SIGNED:
        lo, hi = (lo ^ 8) - 8, (hi ^ 8) - 8
    return lo, hi


# 4 packed bytes (8 codes) -> 4 even + 4 odd FP8 codes, in 17 instructions: mask the nibbles of
# each byte (flipping a signed code's sign bit), spread pairs into fp16 lanes 0x64nn = 1024 + n,
# subtract the bias in fp16x2, convert pairs to e4m3x2 and pack.
_F8_ASM = """{{
    .reg .b32 e, o, h0, h1, h2, h3, bias;
    .reg .b16 f0, f1, f2, f3;
    mov.b32 bias, {bias};
    lop3.b32 e, $2, 0x0f0f0f0f, {flip}, 0x6a;
    shr.b32 o, $2, 4;
    lop3.b32 o, o, 0x0f0f0f0f, {flip}, 0x6a;
    prmt.b32 h0, e, 0x64646464, 0x5140;
    prmt.b32 h1, e, 0x64646464, 0x7362;
    prmt.b32 h2, o, 0x64646464, 0x5140;
    prmt.b32 h3, o, 0x64646464, 0x7362;
    sub.f16x2 h0, h0, bias;
    sub.f16x2 h1, h1, bias;
    sub.f16x2 h2, h2, bias;
    sub.f16x2 h3, h3, bias;
    cvt.rn.satfinite.e4m3x2.f16x2 f0, h0;
    cvt.rn.satfinite.e4m3x2.f16x2 f1, h1;
    cvt.rn.satfinite.e4m3x2.f16x2 f2, h2;
    cvt.rn.satfinite.e4m3x2.f16x2 f3, h3;
    mov.b32 $0, {{f0, f1}};
    mov.b32 $1, {{f2, f3}};
}}"""
_F8_ASM_SIGNED = tl.constexpr(_F8_ASM.format(flip="0x08080808", bias="0x64086408"))  # 1032 in fp16 lanes
_F8_ASM_UNSIGNED = tl.constexpr(_F8_ASM.format(flip="0x00000000", bias="0x64006400"))  # 1024


@triton.jit
def _nibbles_f8_asm(packed, SIGNED: tl.constexpr):
    """_nibbles_f8 on a GPU: the same arithmetic on 32-bit words of four packed bytes."""
    asm: tl.constexpr = _F8_ASM_SIGNED if SIGNED else _F8_ASM_UNSIGNED
    return tl.inline_asm_elementwise(asm, "=r,=r,r", [packed], dtype=(tl.float8e4nv, tl.float8e4nv), is_pure=True,
                                     pack=4)


@triton.jit
def _nibbles_f8(packed, SIGNED: tl.constexpr, ASM: tl.constexpr):
    """uint8 (R, C) -> (codes 2j, codes 2j+1) as exact FP8 E4M3, without int->float conversions.

    fp16 with bits 0x6400 | n is 1024 + n for a nibble n, so subtracting 1024 (or 1032 after flipping
    the sign bit of a signed code) gives the code exactly, in two bit ops and one fp16 subtract.
    """
    if ASM:
        return _nibbles_f8_asm(packed, SIGNED)
    b = packed.to(tl.int16)
    flip: tl.constexpr = 8 if SIGNED else 0
    lo = (((b ^ flip) & 0xF) | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + flip)
    hi = ((((b >> 4) ^ flip) & 0xF) | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + flip)
    return lo.to(tl.float8e4nv), hi.to(tl.float8e4nv)


@triton.jit
def _fp4_values(packed):
    """uint8 (rows, G/2) of E2M1 codes -> fp16 values (rows, G) in code order."""
    lo, hi = _nibbles(packed, False)
    return tl.interleave(_e2m1_decode(lo), _e2m1_decode(hi)).to(tl.float16)  # codes 2j, 2j+1 in place


# ---------- activations: smooth + quantize + low-rank down, one pass ----------

@triton.jit
def _quantize_act_kernel(x_ptr, smooth_ptr, down_ptr, codes_ptr, scales_ptr, low_ptr, M, K: tl.constexpr,
                         R: tl.constexpr, shift, UNSIGNED: tl.constexpr, FP4: tl.constexpr, G: tl.constexpr,
                         CODES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, G)
    half = tl.arange(0, G // 2)
    rr = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    low = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for g in range(0, K // G):
        k = g * G + cols
        x = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=row_ok[:, None], other=0.0)
        x = (x.to(tl.float32) + shift).to(x.dtype)  # as torch adds a Python float: fp32 math, rounded
        down = tl.load(down_ptr + k[:, None] * R + rr[None, :], mask=rr[None, :] < R, other=0.0)
        low += tl.dot(x.to(tl.float32), down.to(tl.float32), input_precision="ieee")
        sm = tl.load(smooth_ptr + k).to(x.dtype).to(tl.float32)
        xs = tl.math.div_rn(x.to(tl.float32), sm[None, :]).to(x.dtype).to(tl.float32)
        amax = tl.max(tl.abs(xs), axis=1)
        if FP4:
            scale = _e4m3_round(tl.minimum(tl.math.div_rn(amax, 6.0), 448.0))
            safe = tl.where(scale > 0, scale, 1.0)
            v = tl.where(scale[:, None] > 0, tl.math.div_rn(xs, safe[:, None]), 0.0)
            q = _e2m1_encode(v)
            tl.store(scales_ptr + g * M + rows, scale, mask=row_ok)
        else:
            qmax = 15.0 if UNSIGNED else 7.0
            scale = tl.math.div_rn(amax, qmax).to(x.dtype)
            inv = tl.where(scale > 0, tl.math.div_rn(1.0, scale.to(tl.float32)), 0.0)
            qf = _round_half_even(xs * inv[:, None])
            qf = tl.minimum(tl.maximum(qf, 0.0 if UNSIGNED else -8.0), qmax)
            q = qf.to(tl.int32)
            tl.store(scales_ptr + g * M + rows, scale, mask=row_ok)
        lo, hi = tl.split(tl.reshape(q, (BLOCK_M, G // 2, 2)))  # codes 2j and 2j+1
        if CODES == 0:  # two per byte
            packed = ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
            tl.store(codes_ptr + rows[:, None] * (K // 2) + (g * (G // 2) + half)[None, :], packed,
                     mask=row_ok[:, None])
        else:  # one per byte, in the dot's type (fp8 or int8), each group as its even codes then its odd codes
            if CODES == 1:  # int -> fp8 goes through fp16 (exact for 4-bit codes)
                lo, hi = lo.to(tl.float16), hi.to(tl.float16)
            at = codes_ptr + rows[:, None] * K + (g * G + half)[None, :]
            tl.store(at, lo.to(codes_ptr.dtype.element_ty), mask=row_ok[:, None])
            tl.store(at + G // 2, hi.to(codes_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(low_ptr + rows[:, None] * R + rr[None, :], low, mask=row_ok[:, None] & (rr[None, :] < R))


# ---------- the W4A4 GEMM with the low-rank up projection in the epilogue ----------

@triton.jit
def _group_dot(a_ptrs, w_ptrs, row_ok, col_ok, DOT: tl.constexpr, SIGNED_A: tl.constexpr, A_BYTES: tl.constexpr,
               ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr):
    """The exact code dot product of one K group: (BLOCK_M, BLOCK_N) fp32.

    Even and odd codes make two K = G/2 dots. Activation codes come one per byte in the dot's type
    (A_BYTES: evens then odds, straight from memory to the tensor cores) or packed like the weights.
    """
    wb = tl.load(w_ptrs, mask=col_ok[:, None], other=0)
    if A_BYTES:
        a_lo = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        a_hi = tl.load(a_ptrs + G // 2, mask=row_ok[:, None], other=0.0)
    else:
        ab = tl.load(a_ptrs, mask=row_ok[:, None], other=0)
    if DOT == 2:  # NVFP4 emulated: fp16 values, K = 16
        out = tl.dot(_fp4_values(ab), tl.trans(_fp4_values(wb)), out_dtype=tl.float32)
    elif DOT == 0:
        if not A_BYTES:
            a_lo, a_hi = _nibbles_f8(ab, SIGNED_A, ASM)
        w_lo, w_hi = _nibbles_f8(wb, True, ASM)
        out = tl.dot(a_hi, tl.trans(w_hi), tl.dot(a_lo, tl.trans(w_lo), out_dtype=tl.float32), out_dtype=tl.float32)
    else:
        if not A_BYTES:
            a_lo, a_hi = _nibbles(ab, SIGNED_A)
            a_lo, a_hi = a_lo.to(tl.int8), a_hi.to(tl.int8)
        w_lo, w_hi = _nibbles(wb, True)
        part = tl.dot(a_lo, tl.trans(w_lo.to(tl.int8)), out_dtype=tl.int32)
        out = tl.dot(a_hi, tl.trans(w_hi.to(tl.int8)), part, out_dtype=tl.int32).to(tl.float32)
    return out


@triton.jit
def _group_scales(as_ptr, ws_ptr, g, M, N, rows, cols, row_ok, col_ok, DOT: tl.constexpr):
    """s_a · s_w of K group g for the tile, (BLOCK_M, BLOCK_N) fp32; scales are stored group-major."""
    sa = tl.load(as_ptr + g * M + rows, mask=row_ok, other=0.0).to(tl.float32)
    if DOT == 2:  # NVFP4 weight scales: E4M3 bytes
        sw = _e4m3_decode(tl.load(ws_ptr + g * N + cols, mask=col_ok, other=0))
    else:
        sw = tl.load(ws_ptr + g * N + cols, mask=col_ok, other=0.0).to(tl.float32)
    return sa[:, None] * sw[None, :]


@triton.jit
def _w4a4_gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, low_ptr, up_ptr, bias_ptr, wt_ptr, wc_ptr, out_ptr, M, N,
                      K: tl.constexpr, R: tl.constexpr, DOT: tl.constexpr, SIGNED_A: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_WC: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                      GPI: tl.constexpr, A_BYTES: tl.constexpr, ASM: tl.constexpr):
    # Grouped tile order: GROUP_M row tiles share each weight tile while it is in L2.
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    half = tl.arange(0, G // 2)
    row_ok, col_ok = rows < M, cols < N
    groups: tl.constexpr = K // G
    A_STEP: tl.constexpr = G if A_BYTES else G // 2  # bytes of one activation group
    a_ptrs = a_ptr + rows[:, None] * (K // G * A_STEP) + half[None, :]
    w_ptrs = w_ptr + cols[:, None] * (K // 2) + half[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # GPI=2 issues two groups' MMAs before either rescale waits on its result. Groups are added in K
    # order either way, so the result does not change. (Triton waits on each Hopper wgmma right after
    # issuing it when its result feeds a rescale, so a lagged rescale would only cost registers;
    # benchmarks/kernel_static.py shows that wait and what each config costs.)
    for g in range(0, groups, GPI):
        part = _group_dot(a_ptrs, w_ptrs, row_ok, col_ok, DOT, SIGNED_A, A_BYTES, ASM, BLOCK_M, BLOCK_N, G)
        if GPI == 2:
            part2 = _group_dot(a_ptrs + A_STEP, w_ptrs + G // 2, row_ok, col_ok, DOT, SIGNED_A, A_BYTES, ASM,
                               BLOCK_M, BLOCK_N, G)
        acc += part * _group_scales(as_ptr, ws_ptr, g, M, N, rows, cols, row_ok, col_ok, DOT)
        if GPI == 2:
            acc += part2 * _group_scales(as_ptr, ws_ptr, g + 1, M, N, rows, cols, row_ok, col_ok, DOT)
        a_ptrs += GPI * A_STEP
        w_ptrs += GPI * (G // 2)
    if DOT == 2:
        acc = acc * tl.load(wt_ptr).to(tl.float32)
    if HAS_WC:
        acc = acc * tl.load(wc_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    rr = tl.arange(0, BLOCK_R)
    low = tl.load(low_ptr + rows[:, None] * R + rr[None, :], mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)
    up = tl.load(up_ptr + cols[None, :] * R + rr[:, None], mask=col_ok[None, :] & (rr[:, None] < R), other=0.0)
    acc += tl.dot(low, up.to(tl.float32), input_precision="ieee")
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _config(bm, bn, warps, stages, gpi=1):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "GPI": gpi}, num_warps=warps,
                         num_stages=stages)


# Candidates the GPU autotuner times per (M, N, K, dot type); the benchmark records the winner.
# 4-warp tiles let two CTAs share an SM, so one CTA's MMAs overlap the other's rescale. _prune drops
# the ones that spill registers for a dot type (benchmarks/kernel_static.py; a CPU test checks it).
_TILES = [(128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4), (256, 64, 8, 3), (64, 64, 4, 4)]
GEMM_CONFIGS = [_config(*t) for t in _TILES] + [_config(*t, gpi=2) for t in _TILES[1:4]]
_SPILLS = {DOTS["int8"]: {(64, 128, 4, 1), (64, 128, 4, 2)}}  # (BLOCK_M, BLOCK_N, warps, GPI)


def _prune(configs, named_args, **kwargs):
    """GPI=2 needs an even number of K groups; configs that spill for this dot type are left out."""
    k, g = kwargs.get("K", named_args.get("K")), kwargs.get("G", named_args.get("G"))
    spills = _SPILLS.get(kwargs.get("DOT", named_args.get("DOT")), set())
    return [c for c in configs if (c.kwargs["GPI"] == 1 or (k // g) % 2 == 0)
            and (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.kwargs["GPI"]) not in spills]


_autotuned = triton.autotune(configs=GEMM_CONFIGS, key=["M", "N", "K", "DOT", "SIGNED_A", "A_BYTES"],
                             prune_configs_by={"early_config_prune": _prune})(_w4a4_gemm_kernel)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(max(n, 1)))


CODE_FORMATS = {"packed": (0, torch.uint8), "fp8": (1, torch.float8_e4m3fn), "int8": (2, torch.int8)}


def act_code_format(dot: str) -> str:
    """The activation code format a layer quantizes to for a dot type: one per byte for INT4, packed for NVFP4."""
    return dot if dot in CODE_FORMATS else "packed"


def quantize_act(x: torch.Tensor, smooth: torch.Tensor, proj_down: torch.Tensor, shift: float, unsigned: bool,
                 precision: str = "int4", block_m: int = 32, codes: str = "packed"):
    """(M, K) -> codes, scales (M, K/G), x·proj_down (M, R) fp32.

    codes "packed": uint8 (M, K/2), two per byte like the weights. "fp8" | "int8" (INT4 only): one
    per byte (M, K) in the GEMM's dot type, each group's even codes then its odd codes
    (`natural_order` undoes that), so the GEMM feeds them to the tensor cores unconverted.
    Scales are in x's dtype for INT4 and fp32 (holding E4M3 values) for NVFP4.
    """
    x, smooth, proj_down = x.contiguous(), smooth.contiguous(), proj_down.contiguous()
    fp4 = precision == "nvfp4"
    group = NVFP4_GROUP if fp4 else INT4_GROUP
    m, k = x.shape
    r = proj_down.shape[1]
    fmt, code_dtype = CODE_FORMATS[codes]
    if fp4 and fmt:
        raise ValueError("NVFP4 activation codes are packed two per byte (codes='packed')")
    codes = torch.empty(m, k // 2 if fmt == 0 else k, dtype=code_dtype, device=x.device)
    # group-major, so the GEMM reads each group's scales contiguously; returned as an (M, K/G) view
    scales = torch.empty(k // group, m, dtype=torch.float32 if fp4 else x.dtype, device=x.device)
    low = torch.empty(m, r, dtype=torch.float32, device=x.device)
    _quantize_act_kernel[(triton.cdiv(m, block_m),)](
        x, smooth, proj_down, codes, scales, low, m, k, r, float(shift), UNSIGNED=unsigned and not fp4, FP4=fp4,
        G=group, CODES=fmt, BLOCK_M=block_m, BLOCK_R=_pow2(r))
    return codes, scales.t(), low


def natural_order(codes: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """One-per-byte activation codes (evens then odds per group) -> integer codes in K order."""
    m, k = codes.shape
    split = codes.float().to(torch.int8).view(m, k // group, 2, group // 2)
    return split.transpose(-1, -2).reshape(m, k)


def w4a4_gemm(a_codes, a_scales, w_codes, w_scales, low, proj_up, bias, out_dtype, dot: str = "fp8",
              unsigned: bool = False, wtscale=None, wcscales=None, *, block_m: Optional[int] = None,
              block_n: Optional[int] = None, gpi: int = 1):
    """Σ_g dot_g · s_a · s_w (fp32, K order) [· wtscale · wcscales] + bias + low·proj_upᵀ -> (M, N).

    a_codes: packed (M, K/2) uint8, or one per byte (M, K) as quantize_act writes them for dot "fp8"
    (float8_e4m3fn) or "int8" (int8). w_codes: packed (N, K/2). dot: "fp8" | "int8" (INT4) or "fp16" (NVFP4,
    w_scales float8_e4m3fn, wtscale a 0-d fp32 tensor). With block_m/block_n (gpi) given, or in
    the interpreter, those tiles run; otherwise the autotuner picks from GEMM_CONFIGS.
    """
    fp4 = dot == "fp16"
    if fp4 and w_scales.dtype == torch.float8_e4m3fn:
        w_scales = w_scales.view(torch.uint8)
    a_codes, w_codes, low, proj_up = (t.contiguous() for t in (a_codes, w_codes, low, proj_up))
    a_scales, w_scales = a_scales.t().contiguous(), w_scales.t().contiguous()  # group-major: free for our layouts
    a_bytes = a_codes.dtype != torch.uint8
    if a_bytes and a_codes.dtype != CODE_FORMATS.get(dot, (0, None))[1]:
        raise ValueError(f"activation codes of dtype {a_codes.dtype} do not feed dot {dot!r}: quantize them with "
                         f"codes={dot!r} or 'packed'")
    m, k = a_codes.shape[0], w_codes.shape[1] * 2
    n = w_codes.shape[0]
    r = proj_up.shape[1]
    out = torch.empty(m, n, dtype=out_dtype, device=a_codes.device)
    dummy = w_scales
    args = (a_codes, a_scales, w_codes, w_scales, low, proj_up, bias if bias is not None else dummy,
            wtscale if wtscale is not None else dummy, wcscales if wcscales is not None else dummy, out, m, n)
    meta = dict(K=k, R=r, DOT=DOTS[dot], SIGNED_A=not unsigned or fp4, HAS_BIAS=bias is not None,
                HAS_WC=wcscales is not None, G=NVFP4_GROUP if fp4 else INT4_GROUP, BLOCK_R=_pow2(r),
                A_BYTES=a_bytes, ASM=not interpreting())  # PTX needs a GPU; the interpreter runs the same math in Triton ops
    if block_m or block_n or interpreting() or a_codes.device.type != "cuda":
        block_m, block_n = block_m or 32, block_n or 32
        grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
        if (k // meta["G"]) % gpi:
            raise ValueError(f"gpi={gpi} needs the number of K groups ({k // meta['G']}) to be a multiple of it")
        _w4a4_gemm_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=4, GPI=gpi)
    else:
        _autotuned[lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)](*args, **meta)
    return out


def best_configs() -> dict[str, str]:
    """What the autotuner chose so far, per key: recorded by the benchmark."""
    return {str(key): str(cfg) for key, cfg in getattr(_autotuned, "cache", {}).items()}
