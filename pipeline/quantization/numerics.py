"""4-bit number formats and the W4A4 product, exactly as our kernels compute them.

INT4: symmetric, groups of 64 along K. Weights: s = absmax/7 (stored 16-bit), codes in [-8, 7].
Activations, per token and group at run time: s = absmax/7 in the activation dtype, codes =
saturate(round-half-even(x * (1/s))); unsigned (inputs known >= 0): s = absmax/15, codes 0..15.
NVFP4: E2M1 values {0, .5, 1, 1.5, 2, 3, 4, 6} with sign, groups of 16, FP8 E4M3 group scales;
weights also carry a per-tensor fp32 scale so their group scales fit E4M3's range.
Product: per K-group, the code dot product is exact (small integers / half-integers in fp32);
it is scaled by s_a * s_w in fp32 and accumulated over groups in K order, in fp32.
"""

from __future__ import annotations

import torch

INT4_GROUP = 64
NVFP4_GROUP = 16
FP8_MAX = 448.0
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_MIDPOINTS = (E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2
GELU_SHIFT = 0.171875  # tanh-GELU's minimum is about -0.17: shifted inputs are >= 0, so unsigned
MAX_GEMM_CHUNK = 4096  # rows of activations per reference GEMM chunk (bounds CPU memory)
MAX_DOT_ELEMENTS = 1 << 26  # per chunk, the (groups, rows, N) fp32 group dots held at once (256 MiB)


def group_size(precision: str) -> int:
    return INT4_GROUP if precision == "int4" else NVFP4_GROUP


def _groups(t: torch.Tensor, g: int) -> torch.Tensor:
    if t.shape[-1] % g:
        raise ValueError(f"last dimension {t.shape[-1]} is not a multiple of the group size {g}")
    return t.reshape(*t.shape[:-1], t.shape[-1] // g, g)


# ---------- INT4 ----------

def quantize_int4_weight(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16):
    """(N, K) float -> codes int8 (N, K) in [-8, 7], scales (N, K/64) in scale_dtype."""
    wg = _groups(w.float(), INT4_GROUP)
    scales = (wg.abs().amax(-1) / 7.0).to(scale_dtype)
    s = scales.float().unsqueeze(-1)
    codes = torch.where(s > 0, torch.round(wg / torch.where(s > 0, s, 1.0)), 0.0).clamp(-8, 7)
    return codes.reshape(w.shape).to(torch.int8), scales


def quantize_int4_act(x: torch.Tensor, unsigned: bool = False):
    """(M, K) -> codes int8 (M, K), scales (M, K/64) in x's dtype (the kernels keep them 16-bit)."""
    xg = _groups(x, INT4_GROUP)
    qmax = 15.0 if unsigned else 7.0
    scales = (xg.abs().amax(-1) / qmax).to(x.dtype)
    inv = torch.where(scales > 0, 1.0 / scales.float(), 0.0).unsqueeze(-1)
    lo, hi = (0, 15) if unsigned else (-8, 7)
    codes = torch.round(xg.float() * inv).clamp(lo, hi)
    return codes.reshape(x.shape).to(torch.int8), scales


# ---------- NVFP4 (E2M1 + FP8 E4M3 scales) ----------

def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value (ties to even mantissa), as 4-bit codes: sign << 3 | magnitude index."""
    a = v.abs().float().clamp(max=6.0)
    mids = _E2M1_MIDPOINTS.to(a.device)
    idx = torch.searchsorted(mids, a.contiguous(), right=True)  # ties go up ...
    tie = (idx > 0) & (a == mids[(idx - 1).clamp(min=0)])
    idx = torch.where(tie & (idx % 2 == 1), idx - 1, idx)  # ... unless that makes the mantissa odd
    sign = ((v < 0) & (idx > 0)).to(torch.uint8) << 3
    return sign | idx.to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    values = E2M1_VALUES.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -values, values)


def quantize_nvfp4_weight(w: torch.Tensor, tensor_scale_dtype: torch.dtype = torch.bfloat16):
    """(N, K) -> codes uint8 (N, K), group scales float8_e4m3fn (N, K/16), per-tensor scale (fp32 scalar).

    The per-tensor scale is a value of `tensor_scale_dtype`: Nunchaku files store it 16-bit (`wtscale` (1,), or
    folded into the fused q/k/v layers' per-channel `wcscales`), so what is quantized here is what a file holds."""
    wg = _groups(w.float(), NVFP4_GROUP)
    group_scale = wg.abs().amax(-1) / 6.0
    tensor_scale = (group_scale.max() / FP8_MAX).to(tensor_scale_dtype).float()
    tensor_scale = torch.where(tensor_scale > 0, tensor_scale, torch.ones_like(tensor_scale))
    scales = (group_scale / tensor_scale).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    eff = (scales.float() * tensor_scale).unsqueeze(-1)
    codes = e2m1_encode(torch.where(eff > 0, wg / torch.where(eff > 0, eff, 1.0), 0.0))
    return codes.reshape(w.shape), scales, tensor_scale.float()


def quantize_nvfp4_act(x: torch.Tensor):
    """(M, K) -> codes uint8 (M, K), scales float8_e4m3fn (M, K/16): s = min(absmax/6, 448)."""
    xg = _groups(x.float(), NVFP4_GROUP)
    scales = (xg.abs().amax(-1) / 6.0).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    s = scales.float().unsqueeze(-1)
    codes = e2m1_encode(torch.where(s > 0, xg / torch.where(s > 0, s, 1.0), 0.0))
    return codes.reshape(x.shape), scales


# ---------- two codes per byte (how layers hold codes in memory) ----------

def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (..., K) -> uint8 (..., K/2): byte j = code 2j (low nibble) | code 2j+1 (high nibble).

    Signed INT4 codes are stored as two's-complement nibbles, E2M1 codes as they are. Half the bytes of
    one code per int8, which is what makes a W4 layer a quarter of BF16 in memory and in bandwidth.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack {codes.shape[-1]} codes two per byte: the count must be even")
    nib = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of pack_nibbles: int8 codes in [-8, 7] if signed, else uint8 in [0, 15]."""
    if signed:  # arithmetic shifts of the bytes as int8 sign-extend each nibble
        as_int8 = packed.view(torch.int8)
        pair = (torch.bitwise_left_shift(as_int8, 4) >> 4, as_int8 >> 4)
    else:
        pair = (packed & 0xF, packed >> 4)
    return torch.stack(pair, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# ---------- shared ----------

def decode(codes: torch.Tensor, precision: str) -> torch.Tensor:
    return codes.float() if precision == "int4" else e2m1_decode(codes)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, precision: str, tensor_scale=None) -> torch.Tensor:
    g = group_size(precision)
    vals = _groups(decode(codes, precision), g) * scales.float().unsqueeze(-1)
    if tensor_scale is not None:
        vals = vals * tensor_scale
    return vals.reshape(codes.shape)


def quantize_act(x: torch.Tensor, precision: str, unsigned: bool = False):
    return quantize_int4_act(x, unsigned) if precision == "int4" else quantize_nvfp4_act(x)


def quantize_weight(w: torch.Tensor, precision: str, scale_dtype: torch.dtype = torch.bfloat16):
    """-> (codes, scales, tensor_scale or None)."""
    if precision == "int4":
        codes, scales = quantize_int4_weight(w, scale_dtype)
        return codes, scales, None
    return quantize_nvfp4_weight(w, scale_dtype)


def w4a4_matmul(a_codes, a_scales, w_codes, w_scales, precision: str) -> torch.Tensor:
    """Σ_g (A_g · W_gᵀ) * (s_a,g ⊗ s_w,g), groups accumulated in K order in fp32 -> (M, N) fp32.

    Each group's code dot product is exact (small integers or half-integers), so how the dots are computed does not
    matter (_group_dots); only the scaled accumulation runs group by group, in K order."""
    g = group_size(precision)
    n, groups = w_codes.shape[0], w_codes.shape[1] // g
    ws = w_scales.float().T  # (G, N)
    rows = max(1, min(MAX_GEMM_CHUNK, MAX_DOT_ELEMENTS // max(1, groups * n)))
    out = []
    for start in range(0, a_codes.shape[0], rows):
        a_part = a_codes[start : start + rows]
        dots = _group_dots(a_part, w_codes, precision, g)  # each (m, N), exact
        a_s = a_scales[start : start + rows].float()
        acc = torch.zeros(a_part.shape[0], n, device=a_part.device)
        for k in range(groups):
            acc += dots(k) * (a_s[:, k, None] * ws[None, k])
        out.append(acc)
    return torch.cat(out) if out else torch.zeros(0, n, device=w_codes.device)


def _group_dots(a_codes: torch.Tensor, w_codes: torch.Tensor, precision: str, g: int):
    """k -> group k's code dot products (m, N) in fp32, exact whichever way they are computed. INT4 on the CPU:
    int8 codes through an int32 matmul per group (no fp32 copy of the weight); elsewhere one fp32 bmm for all."""
    if precision == "int4" and a_codes.device.type == "cpu":
        return lambda k: torch._int_mm(a_codes[:, k * g : (k + 1) * g], w_codes[:, k * g : (k + 1) * g].t()).float()
    w_vals = _groups(decode(w_codes, precision), g).permute(1, 2, 0)  # (G, g, N)
    dots = torch.bmm(_groups(decode(a_codes, precision), g).transpose(0, 1), w_vals)
    return lambda k: dots[k]
