"""Triton kernels for the SVDQuant W4A4 layer: fused activation quantization and the W4A4 GEMM.

1. `quantize_act`: one pass over x computes x̂ = (x + shift) / smooth, per-token group scales and
   4-bit codes (INT4 signed or unsigned, 64-groups; or NVFP4: E2M1 codes, 16-groups, E4M3 scales),
   and the low-rank down projection x·proj_down (fp32 accuracy). INT4 codes for the GEMM are written
   one per byte in the dot's type (FP8 or INT8) and in the GEMM's K order, so they reach the tensor
   cores unconverted; NVFP4 codes (and INT4 on request) two per byte. Scales are written group-major.
2. `w4a4_gemm`: per K group, an exact 4-bit dot product on tensor cores, scaled by s_a·s_w and
   accumulated in fp32 in K order, like the reference; the epilogue applies NVFP4's weight tensor and
   channel scales, adds bias and the low-rank up projection, and writes the output dtype.
   Dot types: "fp8" (e4m3; every INT4 code is exact in it; Ada/Hopper/Blackwell), "int8"
   (Turing/Ampere), "fp16" (NVFP4 emulation: E2M1 values are exact in fp16; no native FP4 is used).
3. `w4a4_gemm_gelu_quant`: an MLP's first layer (INT4), whose epilogue applies GELU and does the
   next layer's part of 1. on the tile, so the 16-bit activation between the two layers never
   reaches memory (pipeline/quantization/fused_mlp.py). About 37 instructions per element on top of
   the plain epilogue: the activation kernel's work plus GELU (kernel_static.py reports it).

Where the instructions go (benchmarks/kernel_static.py reports what each tile config compiles to):
- Weight codes are packed as numerics.pack_nibbles does (byte j = codes 2j, 2j+1). Bit operations on
  32-bit words turn 8 packed codes into FP8 (15 instructions) or INT8 (7) codes, 4 even then 4 odd
  (inline PTX on a GPU, the same arithmetic in Triton ops in the interpreter), never by
  int-to-float conversions, which run at a quarter rate. The GEMM's K order inside a group is that
  order (`_k_merge`); activations are written in it, so each group is one K = 64 dot.
- Where the MMAs are fast enough for that conversion to cost more issue slots than memory traffic
  (H100 FP8, A100 INT8: `expand_weights_default`), `expand_weight_codes` first writes the layer's
  weight codes one per byte into a scratch tensor, and the K loop converts nothing.
- INT8 sums become fp32 without conversions either: the MMA adds them to the bits of 1.5·2^23.
- The rescale by s_a ⊗ s_w is the floor: two FP32 instructions per accumulator element and group,
  as long as the group's FP8 MMA. On Hopper the outer product goes to the tensor cores instead (an
  exact K = 16 dot, `_group_scales`), leaving one FMA.
- The low-rank branches (K = rank) run on tensor cores with fp32-level accuracy: down as a 16-bit
  MMA (exact products of 16-bit x and proj_down), up as two TF32 MMAs (only fp32 `low` needs
  splitting), TF32x3 where the model is fp32.
NVFP4 groups (16 codes) are re-interleaved (tl.interleave), since a K=8 dot does not exist.

Both kernels match pipeline/quantization/numerics.py up to fp32 rounding of the scale multiply-adds
(and the TF32 splits' of the low-rank up projection on a GPU).
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

from pipeline.kernels.dispatch import capability

INT4_GROUP, NVFP4_GROUP = 64, 16
DOTS = {"fp8": 0, "int8": 1, "fp16": 2}


# ---------- number formats, in arithmetic the interpreter and the GPU agree on ----------

_RINT_ASM = tl.constexpr("cvt.rni.f32.f32 $0, $1;")  # round to nearest integer, ties to even


@triton.jit
def _round_half_even(q, ON_GPU: tl.constexpr):
    """torch.round's rounding (ties to even): one cvt.rni on a GPU, floor arithmetic in the interpreter.

    (Not floor(q + 0.5) on a GPU: the compiler contracts a product q = a·b into fma(a, b, 0.5), which
    rounds the exact product, not q, and so can differ from torch at ties.)
    """
    if ON_GPU:
        return tl.inline_asm_elementwise(_RINT_ASM, "=r,r", [q], dtype=tl.float32, is_pure=True, pack=1)
    r = tl.floor(q + 0.5)
    tie = (r - q) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _e4m3_round(v, ON_GPU: tl.constexpr):
    """Nearest FP8 E4M3 value of 0 <= v <= 448 (ties to even), as fp32: torch's .to(float8_e4m3fn)."""
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)  # below 2^-6 E4M3 is subnormal: fixed step 2^-9
    quantum = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return _round_half_even(v / quantum, ON_GPU) * quantum


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
def _e2m1_encode(v, ON_GPU: tl.constexpr):
    """fp32 -> E2M1 code (sign << 3 | index of {0, .5, 1, 1.5, 2, 3, 4, 6}), nearest, ties to even."""
    a = tl.minimum(tl.abs(v), 6.0)
    step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
    m = _round_half_even(a / step, ON_GPU) * step
    idx = tl.where(m < 2.0, m * 2.0, tl.where(m < 4.0, m + 2.0, m * 0.5 + 4.0)).to(tl.int32)
    return idx | tl.where((v < 0) & (idx > 0), 8, 0)


@triton.jit
def _e2m1_decode(code):
    mag = code & 7
    val = tl.where(mag < 4, mag.to(tl.float32) * 0.5,
                   tl.where(mag < 6, (mag - 2).to(tl.float32), ((mag - 4) * 2).to(tl.float32)))
    return tl.where((code & 8) != 0, -val, val)


@triton.jit
def _nibbles(packed):
    """uint8 (R, C) -> (codes 2j, codes 2j+1) as int32 (R, C), unsigned."""
    b = packed.to(tl.int32)
    return b & 0xF, (b >> 4) & 0xF


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
def _nibbles_f8(packed, SIGNED: tl.constexpr, ON_GPU: tl.constexpr):
    """uint8 (R, C) -> (codes 2j, codes 2j+1) as exact FP8 E4M3, without int->float conversions.

    fp16 with bits 0x6400 | n is 1024 + n for a nibble n, so subtracting 1024 (or 1032 after flipping
    the sign bit of a signed code) gives the code exactly, in two bit ops and one fp16 subtract.
    """
    if ON_GPU:
        return _nibbles_f8_asm(packed, SIGNED)
    b = packed.to(tl.int16)
    flip: tl.constexpr = 8 if SIGNED else 0
    lo = (((b ^ flip) & 0xF) | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + flip)
    hi = ((((b >> 4) ^ flip) & 0xF) | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + flip)
    return lo.to(tl.float8e4nv), hi.to(tl.float8e4nv)


# 4 packed bytes (8 codes) -> 4 even + 4 odd INT8 codes in 7 instructions: mask the nibbles, and
# sign-extend each byte by adding 0xF0 where its bit 3 is set ((n & 0x08) * 0x1E never carries).
_I8_ASM = """{{
    .reg .b32 s, t, m;
    and.b32 t, $2, 0x0f0f0f0f;
    {sign_lo}
    shr.b32 s, $2, 4;
    and.b32 t, s, 0x0f0f0f0f;
    {sign_hi}
}}"""
_I8_ASM_SIGNED = tl.constexpr(_I8_ASM.format(sign_lo="and.b32 m, $2, 0x08080808;\n    mad.lo.u32 $0, m, 0x1e, t;",
                                             sign_hi="and.b32 m, s, 0x08080808;\n    mad.lo.u32 $1, m, 0x1e, t;"))
_I8_ASM_UNSIGNED = tl.constexpr(_I8_ASM.format(sign_lo="mov.b32 $0, t;", sign_hi="mov.b32 $1, t;"))


@triton.jit
def _nibbles_i8(packed, SIGNED: tl.constexpr, ON_GPU: tl.constexpr):
    """uint8 (R, C) -> (codes 2j, codes 2j+1) as int8, by bit operations on whole 32-bit words on a GPU."""
    if ON_GPU:
        asm: tl.constexpr = _I8_ASM_SIGNED if SIGNED else _I8_ASM_UNSIGNED
        return tl.inline_asm_elementwise(asm, "=r,=r,r", [packed], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    b = packed.to(tl.int32)
    lo, hi = b & 0xF, (b >> 4) & 0xF
    if SIGNED:  # the same arithmetic per byte: + 0xF0 wraps to the negative code in int8
        lo, hi = lo + (lo & 8) * 0x1E, hi + (hi & 8) * 0x1E
    return lo.to(tl.int8), hi.to(tl.int8)


@triton.jit
def _fp4_values(packed):
    """uint8 (rows, G/2) of E2M1 codes -> fp16 values (rows, G) in code order."""
    lo, hi = _nibbles(packed)
    return tl.interleave(_e2m1_decode(lo), _e2m1_decode(hi)).to(tl.float16)  # codes 2j, 2j+1 in place


@triton.jit
def _k_merge(lo, hi, ROWS: tl.constexpr, G: tl.constexpr):
    """Codes 2j (lo) and 2j+1 (hi), (ROWS, G/2) each -> (ROWS, G) in the GEMM's K order.

    Each 8 codes go as their 4 even codes then their 4 odd codes: the order in which the bit-op
    conversion leaves a 32-bit word of packed codes, so the merge moves no bytes. The order inside
    a group does not change its dot product as long as both operands share it.
    """
    both = tl.join(tl.reshape(lo, (ROWS, G // 8, 4)), tl.reshape(hi, (ROWS, G // 8, 4)))  # (ROWS, G/8, 4, 2)
    return tl.reshape(tl.permute(both, (0, 1, 3, 2)), (ROWS, G))


# ---------- activations: smooth + quantize + low-rank down, one pass ----------

@triton.jit
def _int4_quantize(xs, amax, UNSIGNED: tl.constexpr, X_DTYPE: tl.constexpr, ON_GPU: tl.constexpr):
    """INT4 codes (integer-valued fp32) and scales (X_DTYPE) of xs (rows, [groups,] G) whose groups' |max| is
    amax (rows, [groups]): one 16-bit scale per group, codes rounded half to even and clamped."""
    qmax: tl.constexpr = 15.0 if UNSIGNED else 7.0
    scale = tl.math.div_rn(amax, qmax).to(X_DTYPE)
    inv = tl.where(scale > 0, tl.math.div_rn(1.0, scale.to(tl.float32)), 0.0)
    q = _round_half_even(xs * tl.expand_dims(inv, len(xs.shape) - 1), ON_GPU)
    return tl.minimum(tl.maximum(q, 0.0 if UNSIGNED else -8.0), qmax), scale


@triton.jit
def _store_codes(codes_ptr, q, rows, first_col, row_ok, K, CODES: tl.constexpr, BLOCK_M: tl.constexpr,
                 WIDTH: tl.constexpr, COL_EDGE: tl.constexpr):
    """Codes q (BLOCK_M, WIDTH: columns first_col.., integer-valued fp32) into an (M, K) code tensor: packed
    two per byte (CODES 0; INT4 or E2M1 codes), or one per byte in the dot's type (1 fp8, 2 int8) and the
    GEMM's K order. COL_EDGE: columns may run past K (masked)."""
    lo, hi = tl.split(tl.reshape(q, (BLOCK_M, WIDTH // 2, 2)))  # codes 2j and 2j+1
    if CODES == 0:
        half = first_col // 2 + tl.arange(0, WIDTH // 2)
        lo, hi = lo.to(tl.int32), hi.to(tl.int32)
        packed = ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
        ok = row_ok[:, None] & (half[None, :] < K // 2) if COL_EDGE else row_ok[:, None]
        tl.store(codes_ptr + rows[:, None] * (K // 2) + half[None, :], packed, mask=ok)
    else:
        cols = first_col + tl.arange(0, WIDTH)
        merged = _k_merge(lo, hi, BLOCK_M, WIDTH)
        if CODES == 1:  # fp32 -> e4m3 directly: 4-bit codes are exact in it
            codes = merged.to(tl.float8e4nv)
        else:  # the low byte of 1.5·2^23 + q is q (two's complement): no float -> int conversion
            codes = (merged + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)
        ok = row_ok[:, None] & (cols[None, :] < K) if COL_EDGE else row_ok[:, None]
        tl.store(codes_ptr + rows[:, None] * K + cols[None, :], codes, mask=ok)


@triton.jit
def _low_rank_down(x, down, ON_GPU: tl.constexpr):
    """x · proj_down for one K slice, fp32 (rows, R): with 16-bit x and proj_down one MMA (exact products,
    fp32 sums); else fp32-level accuracy on the tensor cores (three TF32 products per term), fp32 in the
    interpreter."""
    if x.dtype == down.dtype and x.dtype != tl.float32:
        return tl.dot(x, down, out_dtype=tl.float32)
    return tl.dot(x.to(tl.float32), down.to(tl.float32), input_precision="tf32x3" if ON_GPU else "ieee")


@triton.jit
def _quantize_act_kernel(x_ptr, smooth_ptr, down_ptr, codes_ptr, scales_ptr, low_ptr, M, stride_xm, K: tl.constexpr,
                         R: tl.constexpr, shift, HAS_SHIFT: tl.constexpr, UNSIGNED: tl.constexpr, FP4: tl.constexpr,
                         G: tl.constexpr, CODES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                         ON_GPU: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, G)
    rr = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    low = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for g in range(0, K // G):
        k = g * G + cols
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=row_ok[:, None], other=0.0)
        if HAS_SHIFT:
            x = (x.to(tl.float32) + shift).to(x.dtype)  # as torch adds a Python float: fp32 math, rounded
        low += _low_rank_down(x, tl.load(down_ptr + k[:, None] * R + rr[None, :], mask=rr[None, :] < R, other=0.0),
                              ON_GPU)
        sm = tl.load(smooth_ptr + k).to(x.dtype).to(tl.float32)
        xs = tl.math.div_rn(x.to(tl.float32), sm[None, :]).to(x.dtype).to(tl.float32)
        amax = tl.max(tl.abs(xs), axis=1)
        if FP4:
            scale = _e4m3_round(tl.minimum(tl.math.div_rn(amax, 6.0), 448.0), ON_GPU)
            safe = tl.where(scale > 0, scale, 1.0)
            q = _e2m1_encode(tl.where(scale[:, None] > 0, tl.math.div_rn(xs, safe[:, None]), 0.0), ON_GPU)
        else:
            q, scale = _int4_quantize(xs, amax, UNSIGNED, x.dtype, ON_GPU)
        tl.store(scales_ptr + g * M + rows, scale, mask=row_ok)
        _store_codes(codes_ptr, q, rows, g * G, row_ok, K, CODES, BLOCK_M, G, False)
    tl.store(low_ptr + rows[:, None] * R + rr[None, :], low, mask=row_ok[:, None] & (rr[None, :] < R))


# ---------- the W4A4 GEMM with the low-rank up projection in the epilogue ----------

@triton.jit
def _dot_codes(packed, SIGNED: tl.constexpr, DOT: tl.constexpr, ON_GPU: tl.constexpr, ROWS: tl.constexpr,
               COLS: tl.constexpr):
    """Packed INT4 codes (ROWS, COLS/2) -> one per byte in the dot's type (FP8 or INT8), in the GEMM's K order."""
    if DOT == 0:
        lo, hi = _nibbles_f8(packed, SIGNED, ON_GPU)
    else:
        lo, hi = _nibbles_i8(packed, SIGNED, ON_GPU)
    return _k_merge(lo, hi, ROWS, COLS)


@triton.jit
def _group_dot(a_ptrs, w_ptrs, DOT: tl.constexpr, SIGNED_A: tl.constexpr, A_BYTES: tl.constexpr,
               W_BYTES: tl.constexpr, ON_GPU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               G: tl.constexpr):
    """The exact code dot product of one K group: (BLOCK_M, BLOCK_N) fp32, one K = G dot.

    Codes of either operand come one per byte in the dot's type, already in the GEMM's K order
    (_k_merge), straight from memory to the tensor cores, or packed two per byte and converted here.
    """
    # rows and columns wrapped into range: no masks, no predicates in the K loop
    if DOT == 2:  # NVFP4 emulated: fp16 values, K = 16
        return tl.dot(_fp4_values(tl.load(a_ptrs)), tl.trans(_fp4_values(tl.load(w_ptrs))), out_dtype=tl.float32)
    if W_BYTES:
        w = tl.load(w_ptrs)
    else:
        w = _dot_codes(tl.load(w_ptrs), True, DOT, ON_GPU, BLOCK_N, G)
    if A_BYTES:
        a = tl.load(a_ptrs)
    else:
        a = _dot_codes(tl.load(a_ptrs), SIGNED_A, DOT, ON_GPU, BLOCK_M, G)
    if DOT == 0:
        return tl.dot(a, tl.trans(w), out_dtype=tl.float32)
    # int32 -> fp32 without int-to-float conversions (a quarter rate): the MMA adds the codes'
    # dot product to the bits of 1.5 * 2^23, where one integer step is one fp32 ulp.
    magic = tl.full((BLOCK_M, BLOCK_N), 0x4B400000, tl.int32)
    out = tl.dot(a, tl.trans(w), magic, out_dtype=tl.int32)
    return out.to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _expand_weights_kernel(w_ptr, out_ptr, N, K: tl.constexpr, DOT: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, ON_GPU: tl.constexpr):
    """Packed signed INT4 weight codes -> one per byte in the dot's type and the GEMM's K order."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    half = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = rows < N
    packed = tl.load(w_ptr + rows[:, None] * (K // 2) + half[None, :], mask=ok[:, None], other=0)
    codes = _dot_codes(packed, True, DOT, ON_GPU, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], codes.to(out_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _group_scales(as_ptr, ws_ptr, g, M, N, rows, cols, DOT: tl.constexpr, SCALE_MMA: tl.constexpr):
    """s_a · s_w of K group g for the tile, (BLOCK_M, BLOCK_N) fp32; scales are stored group-major.

    SCALE_MMA forms the outer product as a K = 16 dot whose only nonzero row of the second operand
    is s_w: the product of two 16-bit floats is exact in fp32 and adding zeros changes nothing, so
    it equals the FP32 multiplies bit for bit, and 64 FP32 multiplies per thread and group leave the
    FP32 pipe, which the rescale otherwise saturates as fast as the FP8 MMAs run.
    """
    if DOT != 2 and SCALE_MMA:
        one = tl.arange(0, 16)
        sa = tl.load(as_ptr + g * M + rows)
        sw = tl.load(ws_ptr + g * N + cols)
        sa16 = tl.broadcast_to(sa[:, None], (sa.shape[0], 16))
        sw16 = tl.where(one[:, None] == 0, sw[None, :], 0.0).to(sw.dtype)
        if sa.dtype == sw.dtype and sa.dtype != tl.float32:  # 16-bit: exact products on the tensor cores
            return tl.dot(sa16, sw16, out_dtype=tl.float32)
        return tl.dot(sa16.to(tl.float32), sw16.to(tl.float32), input_precision="ieee")
    sa = tl.load(as_ptr + g * M + rows).to(tl.float32)
    if DOT == 2:  # NVFP4 weight scales: E4M3 bytes
        sw = _e4m3_decode(tl.load(ws_ptr + g * N + cols))
    else:
        sw = tl.load(ws_ptr + g * N + cols).to(tl.float32)
    return sa[:, None] * sw[None, :]


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile), in grouped order: GROUP_M row tiles share each weight
    tile while it is in L2."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@triton.jit
def _gemm_tile(a_ptr, as_ptr, w_ptr, ws_ptr, low_ptr, up_ptr, bias_ptr, wt_ptr, wc_ptr, rows, cols, M, N,
               K: tl.constexpr, R: tl.constexpr, DOT: tl.constexpr, SIGNED_A: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_WC: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, A_BYTES: tl.constexpr, W_BYTES: tl.constexpr, SCALE_MMA: tl.constexpr,
               ON_GPU: tl.constexpr):
    """The layer's output tile in fp32, before its rounding: scaled group dots, [NVFP4 scales,] bias, low-rank up."""
    row_ok, col_ok = rows < M, cols < N
    # Rows and columns past the edge read row M-1's and column N-1's data instead (wrapped): the
    # K loop then needs no masks, and their results are never stored.
    rows_in, cols_in = tl.where(row_ok, rows, M - 1), tl.where(col_ok, cols, N - 1)
    groups: tl.constexpr = K // G
    A_STEP: tl.constexpr = G if A_BYTES else G // 2  # bytes of one activation group
    W_STEP: tl.constexpr = G if W_BYTES else G // 2  # and of one weight group
    a_ptrs = a_ptr + rows_in[:, None] * (groups * A_STEP) + tl.arange(0, A_STEP)[None, :]
    w_ptrs = w_ptr + cols_in[:, None] * (groups * W_STEP) + tl.arange(0, W_STEP)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, groups):
        part = _group_dot(a_ptrs, w_ptrs, DOT, SIGNED_A, A_BYTES, W_BYTES, ON_GPU, BLOCK_M, BLOCK_N, G)
        acc += part * _group_scales(as_ptr, ws_ptr, g, M, N, rows_in, cols_in, DOT, SCALE_MMA)
        a_ptrs += A_STEP
        w_ptrs += W_STEP
    if DOT == 2:
        acc = acc * tl.load(wt_ptr).to(tl.float32)
    if HAS_WC:
        acc = acc * tl.load(wc_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    rr = tl.arange(0, BLOCK_R)
    low = tl.load(low_ptr + rows[:, None] * R + rr[None, :], mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)
    up = tl.load(up_ptr + cols[None, :] * R + rr[:, None], mask=col_ok[None, :] & (rr[:, None] < R), other=0.0)
    # The low-rank branch (K = rank) on the tensor cores with fp32-level accuracy; as IEEE fp32 FMAs
    # it cost a sixth of the whole GEMM at K = 3072. A 16-bit proj_up is exact in TF32, so only the
    # fp32 `low` is split (its top 11 bits, then the rest): two TF32 products per term instead of
    # TF32x3's three, an eighth of the K loop's MMA time at rank 32 down to a twelfth. The interpreter
    # runs the same split in fp32.
    if up.dtype != tl.float32:
        big = (low.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # 0xFFFFE000: TF32's bits
        precision: tl.constexpr = "tf32" if ON_GPU else "ieee"
        acc += tl.dot(big, up.to(tl.float32), input_precision=precision)
        acc += tl.dot(low - big, up.to(tl.float32), input_precision=precision)
    else:
        acc += tl.dot(low, up, input_precision="tf32x3" if ON_GPU else "ieee")
    return acc


@triton.jit
def _w4a4_gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, low_ptr, up_ptr, bias_ptr, wt_ptr, wc_ptr, res_ptr, gate_ptr,
                      gres_ptr, out_ptr, M, N, tokens, stride_gate, out_tokens, out_image_rows, K: tl.constexpr,
                      R: tl.constexpr, DOT: tl.constexpr, SIGNED_A: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_WC: tl.constexpr, HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, OUT_MAPPED: tl.constexpr,
                      G: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                      A_BYTES: tl.constexpr, W_BYTES: tl.constexpr, SCALE_MMA: tl.constexpr,
                      ON_GPU: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _gemm_tile(a_ptr, as_ptr, w_ptr, ws_ptr, low_ptr, up_ptr, bias_ptr, wt_ptr, wc_ptr, rows, cols, M, N, K, R,
                     DOT, SIGNED_A, HAS_BIAS, HAS_WC, G, BLOCK_R, BLOCK_M, BLOCK_N, A_BYTES, W_BYTES, SCALE_MMA,
                     ON_GPU)
    out_offsets, out_ok = rows[:, None] * N + cols[None, :], (rows < M)[:, None] & (cols < N)[None, :]
    if HAS_RES:  # another layer's output (M, N) added before the one rounding: saves a separate add
        acc += tl.load(res_ptr + out_offsets, mask=out_ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    if HAS_GATE:  # AdaLN-Zero's `residual + gate * y` with diffusers' roundings: y, the product, the sum
        gate = tl.load(gate_ptr + (rows // tokens)[:, None] * stride_gate + cols[None, :], mask=out_ok, other=0.0)
        acc = (acc.to(dtype).to(tl.float32) * gate.to(tl.float32)).to(dtype).to(tl.float32)
        acc += tl.load(gres_ptr + out_offsets, mask=out_ok, other=0.0).to(tl.float32)
    if OUT_MAPPED:  # image b's out_tokens rows go to output rows b·out_image_rows.. (a slice of a joint tensor)
        out_offsets = ((rows // out_tokens) * out_image_rows + rows % out_tokens)[:, None] * N + cols[None, :]
    tl.store(out_ptr + out_offsets, acc.to(dtype), mask=out_ok)


_EX2_ASM = tl.constexpr("ex2.approx.ftz.f32 $0, $1;")
_RCP_ASM = tl.constexpr("rcp.approx.ftz.f32 $0, $1;")
# GELU's tanh form as y·sigmoid(2u), u = √(2/π)·(y + 0.044715·y³): y / (1 + 2^t), t = y·(C1 + C2·y²) = -2u·log2(e)
_GELU_C1 = tl.constexpr(-2.0 * 0.7978845608028654 * 1.4426950408889634)
_GELU_C2 = tl.constexpr(-2.0 * 0.7978845608028654 * 1.4426950408889634 * 0.044715)


@triton.jit
def _gelu(y, ON_GPU: tl.constexpr):
    """GELU (tanh form) of fp32 y, to a few fp32 ulps: the result is rounded to 16 bits next. On a GPU
    one exp2 and one reciprocal (MUFU) and six FP32 instructions per element."""
    t = tl.minimum(y * (_GELU_C1 + _GELU_C2 * (y * y)), 126.0)  # capped: 1 + 2^t stays finite far left
    if ON_GPU:
        e = tl.inline_asm_elementwise(_EX2_ASM, "=r,r", [t], dtype=tl.float32, is_pure=True, pack=1)
        return y * tl.inline_asm_elementwise(_RCP_ASM, "=r,r", [1.0 + e], dtype=tl.float32, is_pure=True, pack=1)
    return y / (1.0 + tl.exp2(t))


@triton.jit
def _w4a4_gemm_gelu_quant_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, low_ptr, up_ptr, bias_ptr, wt_ptr, wc_ptr,
                                 nsmooth_ptr, ndown_ptr, ncodes_ptr, nscales_ptr, nlow_ptr, nshift, M, N,
                                 K: tl.constexpr, R: tl.constexpr, NR: tl.constexpr, DOT: tl.constexpr,
                                 SIGNED_A: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WC: tl.constexpr, G: tl.constexpr,
                                 BLOCK_R: tl.constexpr, BLOCK_NR: tl.constexpr, NEXT_HAS_SHIFT: tl.constexpr,
                                 NEXT_UNSIGNED: tl.constexpr, CODES: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, A_BYTES: tl.constexpr,
                                 W_BYTES: tl.constexpr, SCALE_MMA: tl.constexpr, ON_GPU: tl.constexpr):
    """An MLP's first layer whose output only feeds GELU and then the next W4A4 layer: the epilogue rounds
    the tile as the layer's output, applies GELU, and quantizes it for the next layer (shift, smooth,
    per-group INT4 codes and scales, low-rank down projection), as that layer's activation kernel would.
    The (M, N) 16-bit output is never written, and never read back. The next layer's low-rank down sum
    runs over all N, so each column tile adds its share into `nlow` (fp32, zeroed) atomically."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = _gemm_tile(a_ptr, as_ptr, w_ptr, ws_ptr, low_ptr, up_ptr, bias_ptr, wt_ptr, wc_ptr, rows, cols, M, N, K, R,
                     DOT, SIGNED_A, HAS_BIAS, HAS_WC, G, BLOCK_R, BLOCK_M, BLOCK_N, A_BYTES, W_BYTES, SCALE_MMA,
                     ON_GPU)
    X: tl.constexpr = nscales_ptr.dtype.element_ty  # the model's dtype: INT4 scales are held in it
    h = _gelu(acc.to(X).to(tl.float32), ON_GPU).to(X)  # rounded as the layer's output, then as torch's 16-bit GELU
    if NEXT_HAS_SHIFT:
        h = (h.to(tl.float32) + nshift).to(X)
    nr = tl.arange(0, BLOCK_NR)
    down = tl.load(ndown_ptr + cols[:, None] * NR + nr[None, :], mask=col_ok[:, None] & (nr[None, :] < NR), other=0.0)
    part = _low_rank_down(h, down, ON_GPU)
    tl.atomic_add(nlow_ptr + rows[:, None] * NR + nr[None, :], part, mask=row_ok[:, None] & (nr[None, :] < NR),
                  sem="relaxed")
    # x / smooth as a product with the reciprocal, formed once per column: within two fp32 ulps of the
    # quotient, so once rounded to 16 bits it is the activation kernel's value but for rare ties
    inv_sm = tl.math.div_rn(1.0, tl.load(nsmooth_ptr + cols, mask=col_ok, other=1.0).to(X).to(tl.float32))
    xs = (h.to(tl.float32) * inv_sm[None, :]).to(X).to(tl.float32)
    GROUPS: tl.constexpr = BLOCK_N // G
    xs = tl.reshape(xs, (BLOCK_M, GROUPS, G))
    q, scale = _int4_quantize(xs, tl.max(tl.abs(xs), axis=2), NEXT_UNSIGNED, X, ON_GPU)
    gi = pid_n * GROUPS + tl.arange(0, GROUPS)
    tl.store(nscales_ptr + gi[None, :] * M + rows[:, None], scale, mask=row_ok[:, None] & (gi[None, :] < N // G))
    _store_codes(ncodes_ptr, tl.reshape(q, (BLOCK_M, BLOCK_N)), rows, pid_n * BLOCK_N, row_ok, N, CODES, BLOCK_M,
                 BLOCK_N, True)


def _config(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


# Candidates the GPU autotuner times per (M, N, K, dot type); the benchmark records the winner.
# 4-warp tiles let two CTAs share an SM, so one CTA's MMAs overlap the other's rescale. _prune drops
# the ones that spill registers in their K loop on the GPU at hand (benchmarks/kernel_static.py;
# a CPU test checks that every kept config compiles without).
GEMM_CONFIGS = [_config(*t) for t in [(128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4), (256, 64, 8, 3),
                                      (64, 64, 4, 4)]]
_SPILLS_MMA_SYNC = {(64, 128, 4)}  # (BLOCK_M, BLOCK_N, warps) on sm_80-89, where MMAs are mma.sync


def _prune(configs, named_args, arch: Optional[int] = None, **kwargs):
    """Leave out the configs that spill in the K loop on this GPU (arch 90, 89, ...; default: the current one)."""
    if arch is None and torch.cuda.is_available():
        arch = device_arch(torch.device("cuda"))
    spills = _SPILLS_MMA_SYNC if arch is not None and arch < 90 else set()
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) not in spills]


_KEY = ["M", "N", "K", "DOT", "SIGNED_A", "A_BYTES", "W_BYTES", "SCALE_MMA"]
_autotuned = triton.autotune(configs=GEMM_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(
    _w4a4_gemm_kernel)
# Every config's BLOCK_N is a multiple of the INT4 group, as the GELU-quantize epilogue needs. Its atomic
# low-rank sums are zeroed before each timed trial.
_autotuned_gelu_quant = triton.autotune(configs=GEMM_CONFIGS, key=_KEY + ["NR", "CODES"], reset_to_zero=["nlow_ptr"],
                                        prune_configs_by={"early_config_prune": _prune})(_w4a4_gemm_gelu_quant_kernel)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_arch(device: torch.device) -> Optional[int]:
    """Compute capability as 90, 80, ...; None off CUDA (the interpreter)."""
    if device.type != "cuda" or interpreting():
        return None
    major, minor = capability(device)  # asked once per GPU: every GEMM call needs it
    return major * 10 + minor


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
    Scales are in x's dtype for INT4 and fp32 (holding E4M3 values) for NVFP4. x may be a column slice
    of a wider tensor (rows strided, columns contiguous): it is read in place, not copied.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    smooth, proj_down = smooth.contiguous(), proj_down.contiguous()
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
        x, smooth, proj_down, codes, scales, low, m, x.stride(0), k, r, float(shift), HAS_SHIFT=bool(shift),
        UNSIGNED=unsigned and not fp4, FP4=fp4,
        G=group, CODES=fmt, BLOCK_M=block_m, BLOCK_R=_pow2(r), ON_GPU=not interpreting())
    return codes, scales.t(), low


def natural_order(codes: torch.Tensor) -> torch.Tensor:
    """One-per-byte activation codes in the GEMM's K order (4 evens then 4 odds per 8) -> integer codes in K order."""
    m, k = codes.shape
    return codes.float().to(torch.int8).view(m, k // 8, 2, 4).transpose(-1, -2).reshape(m, k)


def expand_weight_codes(w_codes: torch.Tensor, dot: str) -> torch.Tensor:
    """Packed signed INT4 weight codes (N, K/2) -> one per byte (N, K) in the dot's type ("fp8" | "int8")
    and the GEMM's K order, as quantize_act writes activation codes: a per-call scratch copy."""
    if dot not in ("fp8", "int8"):
        raise ValueError(f"weight codes expand for the INT4 dots 'fp8' and 'int8', not {dot!r}")
    w_codes = w_codes.contiguous()
    n, k = w_codes.shape[0], w_codes.shape[1] * 2
    if k % INT4_GROUP:
        raise ValueError(f"K = {k} is not a multiple of the INT4 group size {INT4_GROUP}")
    out = torch.empty(n, k, dtype=CODE_FORMATS[dot][1], device=w_codes.device)
    block_n, block_k = 64, 128 if k % 128 == 0 else 64
    _expand_weights_kernel[(triton.cdiv(n, block_n), k // block_k)](
        w_codes, out, n, K=k, DOT=DOTS[dot], BLOCK_N=block_n, BLOCK_K=block_k, ON_GPU=not interpreting())
    return out


# Where expanding weight codes before the GEMM pays: the K loop's conversion costs issue slots that
# H100's FP8 and A100's INT8 MMAs would otherwise overlap (benchmarks/kernel_static.py: 239 -> 175 and
# 488 -> ~350 instructions per group at 128x64), for N·K·1.5 bytes of extra memory traffic per call.
# On Ada (FP8) and GA10x (sm_86, INT8) the slower MMAs hide the conversion already.
_EXPAND_WEIGHTS = {("fp8", 90), ("int8", 80)}


def expand_weights_default(dot: str, arch: Optional[int]) -> bool:
    """Expand packed weight codes to one per byte before the GEMM (gpu_bench times both ways)?"""
    return (dot, arch) in _EXPAND_WEIGHTS


def scale_mma_default(dot: str, arch: Optional[int], a_dtype: torch.dtype, w_dtype: torch.dtype) -> bool:
    """Form s_a ⊗ s_w on the tensor cores? Where it is exact (16-bit scales of one dtype, INT4) and pays:
    Hopper (arch 90), whose warpgroup MMA takes the 16-wide operand as it is. With mma.sync (Ampere,
    Ada) the operand shuffles cost more than the multiplies saved (benchmarks/kernel_static.py shows both)."""
    return dot != "fp16" and arch == 90 and a_dtype == w_dtype and a_dtype in (torch.float16, torch.bfloat16)


def _gemm_operands(a_codes, a_scales, w_codes, w_scales, low, proj_up, bias, dot, unsigned, wtscale, wcscales,
                   scale_mma, expand_weights):
    """The GEMM's tensor arguments (bias, wtscale, wcscales; dummies where absent), its compile-time
    settings, and (M, N): checked, laid out as the kernel reads them."""
    fp4 = dot == "fp16"
    if fp4 and w_scales.dtype == torch.float8_e4m3fn:
        w_scales = w_scales.view(torch.uint8)
    arch = device_arch(a_codes.device)
    if w_codes.dtype == torch.uint8 and not fp4 and (
            expand_weights if expand_weights is not None else expand_weights_default(dot, arch)):
        w_codes = expand_weight_codes(w_codes, dot)
    a_codes, w_codes, low, proj_up = (t.contiguous() for t in (a_codes, w_codes, low, proj_up))
    a_scales, w_scales = a_scales.t().contiguous(), w_scales.t().contiguous()  # group-major: free for our layouts
    a_bytes, w_bytes = a_codes.dtype != torch.uint8, w_codes.dtype != torch.uint8
    for name, codes, bytes_ in (("activation", a_codes, a_bytes), ("weight", w_codes, w_bytes)):
        if bytes_ and codes.dtype != CODE_FORMATS.get(dot, (0, None))[1]:
            how = "quantize them with codes=" if name == "activation" else "expand them with dot="
            raise ValueError(f"{name} codes of dtype {codes.dtype} do not feed dot {dot!r}: {how}{dot!r} or "
                             f"pass them packed (uint8)")
    m, n = a_codes.shape[0], w_codes.shape[0]
    k = w_codes.shape[1] * (1 if w_bytes else 2)
    r = proj_up.shape[1]
    dummy = w_scales
    tensors = (a_codes, a_scales, w_codes, w_scales, low, proj_up, bias if bias is not None else dummy,
               wtscale if wtscale is not None else dummy, wcscales if wcscales is not None else dummy)
    meta = dict(K=k, R=r, DOT=DOTS[dot], SIGNED_A=not unsigned or fp4, HAS_BIAS=bias is not None,
                HAS_WC=wcscales is not None, G=NVFP4_GROUP if fp4 else INT4_GROUP, BLOCK_R=_pow2(r),
                A_BYTES=a_bytes, W_BYTES=w_bytes, SCALE_MMA=(scale_mma if scale_mma is not None else
                                                             scale_mma_default(dot, arch, a_scales.dtype,
                                                                               w_scales.dtype)) and not fp4,
                ON_GPU=not interpreting())  # inline PTX, TF32 splits; the interpreter runs the same math in Triton ops
    return tensors, meta, m, n


def _launch(kernel, autotuned, args, meta, m, n, device, block_m, block_n, interpreter_tiles=(32, 32)):
    """Run with the tiles given, or in the interpreter with fixed small ones; else the autotuner picks."""
    if block_m or block_n or interpreting() or device.type != "cuda":
        block_m, block_n = block_m or interpreter_tiles[0], block_n or interpreter_tiles[1]
        grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
        kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=4)
    else:
        autotuned[lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)](*args, **meta)


def w4a4_gemm(a_codes, a_scales, w_codes, w_scales, low, proj_up, bias, out_dtype, dot: str = "fp8",
              unsigned: bool = False, wtscale=None, wcscales=None, residual=None, gate=None, gated_residual=None, *,
              out: Optional[torch.Tensor] = None, block_m: Optional[int] = None, block_n: Optional[int] = None,
              scale_mma: Optional[bool] = None, expand_weights: Optional[bool] = None):
    """Σ_g dot_g · s_a · s_w (fp32, K order) [· wtscale · wcscales] + bias + low·proj_upᵀ [+ residual] -> (M, N),
    then [gated_residual + gate · that], each step rounded to out_dtype as diffusers' AdaLN-Zero blocks round.

    a_codes: packed (M, K/2) uint8, or one per byte (M, K) as quantize_act writes them for dot "fp8"
    (float8_e4m3fn) or "int8" (int8). w_codes: packed (N, K/2), or one per byte (N, K) as
    expand_weight_codes writes them. dot: "fp8" | "int8" (INT4) or "fp16" (NVFP4, w_scales
    float8_e4m3fn, wtscale a 0-d fp32 tensor). scale_mma: form s_a ⊗ s_w on the tensor cores or with
    FP32 multiplies (default: scale_mma_default). expand_weights: expand packed weight codes to one per
    byte first, into a scratch tensor (default: expand_weights_default). With block_m/block_n given,
    or in the interpreter, those tiles run; otherwise the autotuner picks from GEMM_CONFIGS. gate (B, N): one
    row per image, the M rows being B images' tokens in order; gated_residual (M, N). out: where to write
    instead of a new (M, N) tensor, a (B, S, N) view whose rows are contiguous (a slice of a joint
    (B, ΣS, N) tensor along its tokens, say), M = B·S; it is returned.
    """
    tensors, meta, m, n = _gemm_operands(a_codes, a_scales, w_codes, w_scales, low, proj_up, bias, dot, unsigned,
                                         wtscale, wcscales, scale_mma, expand_weights)
    out_tokens, out_image_rows = m, 0
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=a_codes.device)
    elif (out.dim() != 3 or out.shape[0] * out.shape[1] != m or out.shape[2] != n or out.dtype != out_dtype
          or out.stride(2) != 1 or out.stride(1) != n or out.stride(0) % n):
        raise ValueError(f"out of shape {tuple(out.shape)}, strides {out.stride()}, {out.dtype} is not B images' "
                         f"rows of {n} contiguous {out_dtype} values, {m} rows in all")
    elif out.shape[0] > 1 and out.stride(0) != out.shape[1] * n:  # else its rows follow one another
        out_tokens, out_image_rows = out.shape[1], out.stride(0) // n
    for name, t in (("residual", residual), ("gated_residual", gated_residual)):
        if t is not None and tuple(t.shape) != (m, n):
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not match the output ({m}, {n})")
    if (gate is None) != (gated_residual is None):
        raise ValueError("gate and gated_residual go together: the output is gated_residual + gate · y")
    tokens = 1
    if gate is not None:
        if gate.dim() != 2 or gate.shape[1] != n or m % gate.shape[0]:
            raise ValueError(f"gate of shape {tuple(gate.shape)} is not one row of {n} per image of {m} tokens")
        tokens = m // gate.shape[0]
        gate, gated_residual = (gate if gate.stride(-1) == 1 else gate.contiguous()), gated_residual.contiguous()
    dummy = tensors[3]
    args = (*tensors, residual.contiguous() if residual is not None else dummy,
            gate if gate is not None else dummy, gated_residual if gated_residual is not None else dummy, out, m, n,
            tokens, gate.stride(0) if gate is not None else 0, out_tokens, out_image_rows)
    _launch(_w4a4_gemm_kernel, _autotuned, args, dict(meta, HAS_RES=residual is not None, HAS_GATE=gate is not None,
                                                      OUT_MAPPED=out_image_rows != 0), m, n, a_codes.device,
            block_m, block_n)
    return out


def w4a4_gemm_gelu_quant(a_codes, a_scales, w_codes, w_scales, low, proj_up, bias, out_dtype, dot: str,
                         unsigned: bool, next_smooth, next_down, next_shift: float, next_unsigned: bool, *,
                         block_m: Optional[int] = None, block_n: Optional[int] = None,
                         scale_mma: Optional[bool] = None, expand_weights: Optional[bool] = None):
    """An INT4 layer followed by GELU (tanh) and the next INT4 layer's activation quantization, in one GEMM.

    Takes w4a4_gemm's operands (dot "fp8" | "int8"), out_dtype being the model's 16-bit (or fp32) dtype,
    and the next layer's smooth, proj_down, shift and signedness. Returns what quantize_act would return
    for gelu(layer output) and the next layer: its codes one per byte in the dot's type (M, N), scales
    (M, N/64) and the low-rank down projection (M, R') in fp32, summed over column tiles in no fixed
    order. Rounding as the unfused path: the layer's output, GELU's and x/smooth all round to out_dtype;
    GELU and the division (a product with smooth's reciprocal) differ from torch's in the last fp32
    bits, so an element may rarely land one 16-bit step off, and its code one step.
    """
    if dot not in ("fp8", "int8"):
        raise ValueError(f"the GELU-quantize epilogue runs INT4 layers (dot 'fp8' or 'int8'), not dot {dot!r}")
    if block_n is not None and block_n % INT4_GROUP:
        raise ValueError(f"block_n = {block_n} must be a multiple of the INT4 group ({INT4_GROUP}): "
                         "each column tile quantizes whole groups")
    tensors, meta, m, n = _gemm_operands(a_codes, a_scales, w_codes, w_scales, low, proj_up, bias, dot, unsigned,
                                         None, None, scale_mma, expand_weights)
    if n % INT4_GROUP:
        raise ValueError(f"the layer's N = {n} is not a multiple of the INT4 group ({INT4_GROUP}): it cannot "
                         "be the next layer's input")
    if tuple(next_down.shape[:1]) != (n,) or tuple(next_smooth.shape) != (n,):
        raise ValueError(f"the next layer takes {next_smooth.shape[0]} inputs (proj_down {tuple(next_down.shape)}), "
                         f"this layer gives {n}")
    fmt, code_dtype = CODE_FORMATS[dot]
    codes = torch.empty(m, n, dtype=code_dtype, device=a_codes.device)
    scales = torch.empty(n // INT4_GROUP, m, dtype=out_dtype, device=a_codes.device)  # group-major
    nr = next_down.shape[1]
    next_low = torch.zeros(m, nr, dtype=torch.float32, device=a_codes.device)
    args = (*tensors, next_smooth.contiguous(), next_down.contiguous(), codes, scales, next_low, float(next_shift),
            m, n)
    meta = dict(meta, NR=nr, BLOCK_NR=_pow2(nr), NEXT_HAS_SHIFT=bool(next_shift), NEXT_UNSIGNED=next_unsigned,
                CODES=fmt)
    _launch(_w4a4_gemm_gelu_quant_kernel, _autotuned_gelu_quant, args, meta, m, n, a_codes.device, block_m, block_n,
            interpreter_tiles=(32, INT4_GROUP))
    return codes, scales.t(), next_low


def best_configs() -> dict[str, str]:
    """What the autotuner chose so far, per key (the GELU-quantize GEMM's marked so): recorded by the benchmark."""
    found = {str(key): str(cfg) for key, cfg in getattr(_autotuned, "cache", {}).items()}
    found.update({f"gelu_quant {key}": str(cfg) for key, cfg in getattr(_autotuned_gelu_quant, "cache", {}).items()})
    return found
