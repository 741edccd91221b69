"""Regenerate tests/data/golden_int4.safetensors: packed tensors and outputs derived from the spec.

    python tests/data/make_golden.py

Written independently of pipeline/quantization: element-by-element index arithmetic from the
layout description in ../shared/docs/nunchaku-format.md (no reshape/permute), and the INT4 W4A4
forward in float64 with plain loops. The test compares the engine's packer and reference layer
against these values.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

N, K, R, M = 128, 128, 16, 4
OUT = Path(__file__).with_name("golden_int4.safetensors")


def fixed_inputs():
    """Small integer-pattern tensors: every value is exactly representable, nothing random."""
    codes = torch.tensor([[((n * 7 + k * 3) % 16) - 8 for k in range(K)] for n in range(N)], dtype=torch.int8)
    scales = torch.tensor([[0.01 * (1 + (n + 3 * g) % 5) for g in range(K // 64)] for n in range(N)],
                          dtype=torch.bfloat16)
    smooth = torch.tensor([1.0 + (k % 4) * 0.5 for k in range(K)], dtype=torch.bfloat16)
    down = torch.tensor([[((k + 2 * r) % 7 - 3) / 64 for r in range(R)] for k in range(K)], dtype=torch.bfloat16)
    up = torch.tensor([[((n * 3 + r) % 5 - 2) / 32 for r in range(R)] for n in range(N)], dtype=torch.bfloat16)
    bias = torch.tensor([(n % 9 - 4) / 16 for n in range(N)], dtype=torch.bfloat16)
    x = torch.tensor([[((m * 5 + k * 11) % 17 - 8) / 4 for k in range(K)] for m in range(M)], dtype=torch.float32)
    x[:, 5] *= 20.0  # an outlier channel
    return codes, scales, smooth, down, up, bias, x


def pack_codes_by_index(codes):
    """Destination of code (n, k): axes (n_tile, k_tile, k_pack, n_pack, n_lane, k_lane, n_pack_size,
    k_pack_size, reg_n, reg_k) with n = 128 n_tile + 16 n_pack + 8 n_pack_size + n_lane and
    k = 64 k_tile + 32 k_pack_size + 8 k_lane + reg_k; 8 codes per little-endian word, code i at bits 4i."""
    out = bytearray(N * K // 2)
    k_tiles = K // 64
    for n in range(N):
        nt, rem = divmod(n, 128)
        npk, rem = divmod(rem, 16)
        nps, nl = divmod(rem, 8)
        for k in range(K):
            kt, rem = divmod(k, 64)
            kps, rem = divmod(rem, 32)
            kl, rk = divmod(rem, 8)
            flat = ((((((nt * k_tiles + kt) * 1 + 0) * 8 + npk) * 8 + nl) * 4 + kl) * 2 + nps) * 2 + kps
            flat = flat * 8 + rk
            nibble = int(codes[n, k]) & 0xF
            byte = flat // 2
            out[byte] |= nibble << (4 * (flat % 2))
    return torch.frombuffer(out, dtype=torch.uint8).clone().view(torch.int8).reshape(N, K // 2)


def pack_scales_by_index(scales):
    """INT4 group scales: n = 128 t + 16 a + 8 b + 2 c + d, i.e. n viewed as (t, 1, a 8, b 2, c 4, d 2),
    then the group g; the spec permutes (t, 1, a, b, c, d, g) to axis order (0, 6, 1, 2, 4, 3, 5)."""
    groups = K // 64
    dims = (N // 128, 1, 8, 2, 4, 2, groups)
    perm = (0, 6, 1, 2, 4, 3, 5)
    out = torch.empty(N * groups, dtype=scales.dtype)
    for n in range(N):
        idx = []
        rem = n
        for size in (128, 128, 16, 8, 2, 1):  # strides of (t, one, a, b, c, d) within n
            q, rem = divmod(rem, size)
            idx.append(q)
        t, one, a, b, c, d = idx[0], 0, idx[2], idx[3], idx[4], idx[5]
        for g in range(groups):
            src = (t, one, a, b, c, d, g)
            dst = [src[p] for p in perm]
            dst_dims = [dims[p] for p in perm]
            flat = 0
            for i, size in zip(dst, dst_dims):
                flat = flat * size + i
            out[flat] = scales[n, g]
    return out.reshape(groups, N)


def pack_vector_by_index(v):
    """Position 4ℓ + j of each 128-chunk holds channel 16⌊ℓ/4⌋ + 2(ℓ mod 4) + (0, 1, 8, 9)[j]."""
    out = torch.empty_like(v)
    for chunk in range(v.shape[0] // 128):
        for lane in range(32):
            for j, off in enumerate((0, 1, 8, 9)):
                out[chunk * 128 + 4 * lane + j] = v[chunk * 128 + 16 * (lane // 4) + 2 * (lane % 4) + off]
    return out


def pack_lowrank_by_index(mat, transpose_first: bool):
    """16x16 blocks (c, r); inside a block, row i (n side) = 8 n_pack + n_lane, col j (k side) =
    8 k_pack + 2 k_lane + reg_k, stored in order (c, r, n_lane, k_lane, n_pack, k_pack, reg_n, reg_k)."""
    src = mat.T if transpose_first else mat  # down: (R, K) blocks are (k-block c, r-block); up: (N, R)
    rows, cols = mat.shape  # stored shape
    out = torch.empty(rows * cols, dtype=mat.dtype)
    c_packs, r_packs = rows // 16, cols // 16
    for c in range(c_packs):
        for r in range(r_packs):
            for i in range(16):
                for j in range(16):
                    if transpose_first:  # down: block (K/16, R/16, 16 r, 16 k)
                        value = src[r * 16 + i, c * 16 + j]
                    else:  # up: block (N/16, R/16, 16 n, 16 r)
                        value = src[c * 16 + i, r * 16 + j]
                    n_pack, n_lane = divmod(i, 8)
                    k_pack, rem = divmod(j, 8)
                    k_lane, reg_k = divmod(rem, 2)
                    flat = ((((((c * r_packs + r) * 8 + n_lane) * 4 + k_lane) * 2 + n_pack) * 2 + k_pack) * 1) * 2 + reg_k
                    out[flat] = value
    return out.reshape(rows, cols)


def round_half_even(v: float) -> float:
    return float(torch.round(torch.tensor(v, dtype=torch.float64)))


def forward_float64(codes, scales, smooth, down, up, bias, x):
    """y = x·down·upᵀ + Σ_g dot_g(Q(x/smooth), codes) · s_a · s_w + bias, per the INT4 spec, in float64."""
    y = torch.zeros(M, N, dtype=torch.float64)
    for m in range(M):
        xs = [float(torch.tensor(float(x[m, k]), dtype=torch.float32) / float(smooth[k])) for k in range(K)]
        xs = [float(torch.tensor(v, dtype=torch.float32)) for v in xs]  # the division happens in fp32
        low = [sum(float(x[m, k]) * float(down[k, r]) for k in range(K)) for r in range(R)]
        for g in range(K // 64):
            block = xs[g * 64 : (g + 1) * 64]
            s_a = float(torch.tensor(max(abs(v) for v in block) / 7.0, dtype=torch.float32))
            q = [max(-8, min(7, round_half_even(v * float(torch.tensor(1.0 / s_a, dtype=torch.float32))))) for v in block]
            for n in range(N):
                dot = sum(q[i] * int(codes[n, g * 64 + i]) for i in range(64))
                y[m, n] += dot * s_a * float(scales[n, g])
        for n in range(N):
            y[m, n] += float(bias[n]) + sum(low[r] * float(up[n, r]) for r in range(R))
    return y


def main() -> None:
    codes, scales, smooth, down, up, bias, x = fixed_inputs()
    tensors = {
        "codes": codes, "scales": scales, "smooth": smooth, "proj_down": down, "proj_up": up, "bias": bias, "x": x,
        "packed.qweight": pack_codes_by_index(codes),
        "packed.wscales": pack_scales_by_index(scales),
        "packed.smooth_factor": pack_vector_by_index(smooth),
        "packed.bias": pack_vector_by_index(bias),
        "packed.proj_down": pack_lowrank_by_index(down, transpose_first=True),
        "packed.proj_up": pack_lowrank_by_index(up, transpose_first=False),
        "y": forward_float64(codes, scales, smooth, down, up, bias, x),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
