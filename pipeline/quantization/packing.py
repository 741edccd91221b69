"""Nunchaku's on-disk tensor layouts: the MMA tile orders its kernels read, and their inverses.

Every layout is a reshape + permute (plus nibble packing for 4-bit codes), so each `pack_*` has an
exact `unpack_*`. The axis names and orders follow ../shared/docs/nunchaku-format.md (warp_n 128,
4-bit codes, 8 codes per 32-bit register, MMA k-lanes x n-lanes).
"""

from __future__ import annotations

import torch

from pipeline.quantization.numerics import pack_nibbles, unpack_nibbles

# Weight codes (N, K): (n_tiles, n_packs 8, n_pack_size 2, n_lanes 8, reg_n 1,
#                       k_tiles, k_packs 1, k_pack_size 2, k_lanes 4, reg_k 8)
_W_PERM = (0, 5, 6, 1, 3, 8, 2, 7, 4, 9)
# INT4 scales (N, K/64): N as (N/128, 1, 8, 2, 4, 2), then K/64; stored (K/64, N)
_S_INT4_PERM = (0, 6, 1, 2, 4, 3, 5)
# NVFP4 scales (N, K/16): N as (N/128, 1, 4, 4, 8), K/16 as (K/64, 4); stored (K/16, N)
_S_FP4_PERM = (0, 5, 1, 4, 3, 2, 6)
# Low-rank 16x16 blocks: (c_packs, r_packs, n_pack 2, n_lanes 8, reg_n 1, k_pack 2, k_lanes 4, reg_k 2).
# (The shared doc says k_pack 1, but 1 x 4 lanes x 2 regs covers only 8 of the block's 16 k; an
# m16n8k16 fragment holds 2 x 2 x 2 = 8 values in each of the 32 lanes, so k_pack is 2.)
_LR_PERM = (0, 1, 3, 6, 2, 5, 4, 7)
WARP_N = 128
K_TILE = 64


def _permute(t: torch.Tensor, view: tuple[int, ...], perm: tuple[int, ...]) -> torch.Tensor:
    return t.reshape(view).permute(perm).contiguous()


def _unpermute(t: torch.Tensor, view: tuple[int, ...], perm: tuple[int, ...], shape) -> torch.Tensor:
    inverse = [perm.index(i) for i in range(len(perm))]
    return t.reshape([view[p] for p in perm]).permute(inverse).contiguous().reshape(shape)


def check_tileable(n: int, k: int, what: str) -> None:
    if n % WARP_N or k % (2 * K_TILE):
        raise ValueError(f"{what}: out_features {n} must be a multiple of {WARP_N} and in_features {k} of "
                         f"{2 * K_TILE} for Nunchaku's tile layout")


def _word_view(n: int, k: int) -> tuple[int, ...]:
    """The weight layout over 32-bit words: reg_k (8 consecutive k codes) is the word itself."""
    return (n // WARP_N, 8, 2, 8, 1, k // K_TILE, 1, 2, 4)


_WORD_PERM = _W_PERM[:-1]


def pack_weight_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """Codes held two per byte along K (numerics.pack_nibbles, as the layers hold them) -> the file's int8
    (N, K/2). A file word holds 8 consecutive k codes, code i at bits 4i: as little-endian bytes that is exactly
    the two-per-byte layout, so packing permutes whole 32-bit words and never touches a nibble."""
    n, half = nibbles.shape
    words = nibbles.contiguous().view(torch.int32)
    return _permute(words, _word_view(n, half * 2), _WORD_PERM).view(torch.int8).reshape(n, half)


def unpack_weight_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The file's int8 (N, K/2) -> codes two per byte along K (uint8 (N, K/2)), the inverse of pack_weight_nibbles."""
    n, half = packed.shape
    words = packed.contiguous().view(torch.int32)
    return _unpermute(words, _word_view(n, half * 2), _WORD_PERM, (n, half // 4)).view(torch.uint8)


def pack_weight_codes(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (N, K) -> int8 (N, K/2): tile order, 8 codes per little-endian 32-bit word."""
    return pack_weight_nibbles(pack_nibbles(codes))


def unpack_weight_codes(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    return unpack_nibbles(unpack_weight_nibbles(packed), signed)


def _scale_layout(n: int, groups: int, precision: str):
    if precision == "int4":
        return (n // WARP_N, 1, 8, 2, 4, 2, groups), _S_INT4_PERM
    return (n // WARP_N, 1, 4, 4, 8, groups // 4, 4), _S_FP4_PERM


def pack_wscales(scales: torch.Tensor, precision: str) -> torch.Tensor:
    """Group scales (N, K/G) -> (K/G, N) in tile order."""
    n, groups = scales.shape
    view, perm = _scale_layout(n, groups, precision)
    return _permute(scales, view, perm).reshape(groups, n)


def unpack_wscales(packed: torch.Tensor, precision: str) -> torch.Tensor:
    groups, n = packed.shape
    view, perm = _scale_layout(n, groups, precision)
    return _unpermute(packed, view, perm, (n, groups))


def _vector_order(n: int, device=None) -> torch.Tensor:
    """Packed position 4ℓ+j of each 128-chunk holds channel 16⌊ℓ/4⌋ + 2(ℓ mod 4) + (0, 1, 8, 9)[j]."""
    lane = torch.arange(32).repeat_interleave(4)
    j = torch.arange(4).repeat(32)
    within = 16 * (lane // 4) + 2 * (lane % 4) + torch.tensor([0, 1, 8, 9])[j]
    return (within.repeat(n // WARP_N) + torch.arange(0, n, WARP_N).repeat_interleave(WARP_N)).to(device)


def pack_vector(v: torch.Tensor) -> torch.Tensor:
    """bias, smooth_factor, wcscales: the MMA accumulator fragment order, per 128 channels."""
    return v[_vector_order(v.shape[0], v.device)].contiguous()


def unpack_vector(packed: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(packed)
    out[_vector_order(packed.shape[0], packed.device)] = packed
    return out


def _lowrank_layout(c: int, r: int):
    return (c // 16, r // 16, 2, 8, 1, 2, 4, 2), _LR_PERM


def _pack_lowrank(m: torch.Tensor, block_perm: tuple[int, ...]) -> torch.Tensor:
    """(C, R) -> 16x16 blocks (C/16, R/16, 16, 16) ordered by block_perm, then the MMA tile order."""
    c, r = m.shape
    blocks = _permute(m, (c // 16, 16, r // 16, 16), block_perm)
    view, perm = _lowrank_layout(c, r)
    return _permute(blocks, view, perm).reshape(c, r)


def _unpack_lowrank(packed: torch.Tensor, block_perm: tuple[int, ...]) -> torch.Tensor:
    c, r = packed.shape
    view, perm = _lowrank_layout(c, r)
    blocks = _unpermute(packed, view, perm, (c // 16, r // 16, 16, 16))
    return _unpermute(blocks, (c // 16, 16, r // 16, 16), block_perm, (c, r))


# proj_down's blocks hold (16 r, 16 k): each 16x16 block transposed; proj_up's hold (16 n, 16 r).
_DOWN_BLOCKS, _UP_BLOCKS = (0, 2, 3, 1), (0, 2, 1, 3)


def pack_proj_down(down: torch.Tensor) -> torch.Tensor:
    """Logical (K, R) (applied as x @ down) -> stored (K, R) in tile order."""
    return _pack_lowrank(down, _DOWN_BLOCKS)


def unpack_proj_down(packed: torch.Tensor) -> torch.Tensor:
    return _unpack_lowrank(packed, _DOWN_BLOCKS)


def pack_proj_up(up: torch.Tensor) -> torch.Tensor:
    """Logical (N, R) -> stored (N, R) in tile order."""
    return _pack_lowrank(up, _UP_BLOCKS)


def unpack_proj_up(packed: torch.Tensor) -> torch.Tensor:
    return _unpack_lowrank(packed, _UP_BLOCKS)


# ---------- AWQ W4A16 (modulation layers) ----------
# TinyChat's `pack_w4`, which DeepCompressor's Nunchaku writer uses and the engine's GEMV reads: in each row,
# every run of 32 input channels is one group of 8 16-bit words; word i holds channels i, i+8, i+16, i+24 of the
# run in nibbles 0..3. Rows then interleave by four per 64-channel group: the (N, K/4) words viewed
# (N/4, 4, K/64, 16) are stored (N/4, K/64, 4, 16), i.e. int32 (N/4, K/2).

def pack_awq_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 held two per byte (uint8 (N, K/2)) -> the file's int32 (N/4, K/2)."""
    codes = unpack_nibbles(nibbles, signed=False)
    n, k = codes.shape
    runs = codes.reshape(n, k // 32, 4, 8).transpose(2, 3)  # (row, run, word i, nibble j): channel 32·run + 8j + i
    words = (runs[..., 0::2] | (runs[..., 1::2] << 4)).reshape(n, k // 2).view(torch.int16)  # little-endian words
    grouped = words.reshape(n // 4, 4, k // 64, 16).transpose(1, 2).contiguous()
    return grouped.view(torch.int32).reshape(n // 4, k // 2)


def unpack_awq_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """The file's int32 (N/4, K/2) -> codes 0..15 held two per byte (uint8 (N, K/2)). Channels 2p and 2p+1 of a
    run's eighth j sit at nibble j of words 2p and 2p+1, so each of our bytes joins one nibble of two words."""
    rows4, half = qweight.shape
    n, k = rows4 * 4, half * 2
    words = qweight.contiguous().view(torch.int16).reshape(rows4, k // 64, 4, 16).transpose(1, 2)
    words = words.reshape(n, k // 32, 4, 2)  # (row, run, pair p, even/odd word)
    even, odd = words[..., 0], words[..., 1]
    out = torch.empty(n, k // 32, 4, 4, dtype=torch.uint8)  # (row, run, eighth j, pair p)
    for j in range(4):
        out[:, :, j] = (((even >> 4 * j) & 0xF) | (((odd >> 4 * j) & 0xF) << 4)).to(torch.uint8)
    return out.reshape(n, k // 2)


def pack_awq_codes(codes: torch.Tensor) -> torch.Tensor:
    return pack_awq_nibbles(pack_nibbles(codes))


def unpack_awq_codes(packed: torch.Tensor) -> torch.Tensor:
    return unpack_nibbles(unpack_awq_nibbles(packed), signed=False)


def interleave_rows(t: torch.Tensor, chunks: int) -> torch.Tensor:
    """Modulation outputs chunk-major (c·D + j) -> interleaved (j·chunks + c), as the engine stores them."""
    d = t.shape[0] // chunks
    return t.reshape(chunks, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def deinterleave_rows(t: torch.Tensor, chunks: int) -> torch.Tensor:
    d = t.shape[0] // chunks
    return t.reshape(d, chunks, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()
