"""The inline PTX that turns packed 4-bit codes into FP8/INT8 codes, run by a tiny PTX interpreter.

On a GPU the W4A4 GEMM converts weight codes with the PTX strings in pipeline/kernels/triton_w4a4.py;
the Triton interpreter runs the same arithmetic in Triton ops instead (inline asm cannot run on a
CPU). Here the shipped strings themselves are executed, instruction by instruction, with the
semantics of the PTX ISA, on words covering every byte value in every position, so a wrong
selector, LUT or constant fails on CPU, not first on a lent GPU.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from pipeline.kernels import triton_w4a4 as kw  # noqa: E402

MASK = 0xFFFFFFFF


def _bytes(word: int) -> list[int]:
    return [(word >> (8 * i)) & 0xFF for i in range(4)]


def _prmt(a: int, b: int, sel: int) -> int:
    """prmt.b32 default mode: byte i of the result picks byte (sel nibble i & 7) of {b, a}, or with
    nibble bit 3 set replicates that byte's sign bit."""
    src = _bytes(a) + _bytes(b)
    out = 0
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        byte = src[s & 7]
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def _f16x2(word: int) -> np.ndarray:
    return np.array([word & 0xFFFF, word >> 16], dtype=np.uint16).view(np.float16)


def _sub_f16x2(a: int, b: int) -> int:
    lanes = (_f16x2(a) - _f16x2(b)).astype(np.float16).view(np.uint16)
    return int(lanes[0]) | (int(lanes[1]) << 16)


def _cvt_e4m3x2(word: int) -> int:
    """cvt.rn.satfinite.e4m3x2.f16x2: each f16 lane to an E4M3 byte in the same half, nearest, saturating."""
    lanes = torch.from_numpy(_f16x2(word).astype(np.float32)).clamp(-448, 448).to(torch.float8_e4m3fn)
    lo, hi = lanes.view(torch.uint8).tolist()
    return lo | (hi << 8)


def run_ptx(asm: str, inputs: dict[str, int]) -> dict[str, int]:
    """Execute the PTX subset the conversions use; registers hold Python ints ($n operands included)."""
    regs = dict(inputs)

    def val(tok: str) -> int:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        return int(tok, 16) if tok.lower().startswith("0x") else int(tok)

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and "{" in rest:  # pack two b16 registers, the first in the low half
            dst, lo, hi = re.match(r"(\S+),\s*\{(\w+),\s*(\w+)\}", rest).groups()
            regs[dst] = (val(lo) & 0xFFFF) | ((val(hi) & 0xFFFF) << 16)
            continue
        dst, *args = [t.strip() for t in rest.split(",")]
        if op == "mov.b32":
            regs[dst] = val(args[0]) & MASK
        elif op == "and.b32":
            regs[dst] = val(args[0]) & val(args[1])
        elif op == "shr.b32":
            regs[dst] = (val(args[0]) & MASK) >> val(args[1])
        elif op == "mad.lo.u32":
            regs[dst] = (val(args[0]) * val(args[1]) + val(args[2])) & MASK
        elif op == "lop3.b32":
            regs[dst] = _lop3(*(val(a) for a in args))
        elif op == "prmt.b32":
            regs[dst] = _prmt(*(val(a) for a in args))
        elif op == "sub.f16x2":
            regs[dst] = _sub_f16x2(val(args[0]), val(args[1]))
        elif op == "cvt.rn.satfinite.e4m3x2.f16x2":
            regs[dst] = _cvt_e4m3x2(val(args[0]))
        elif op == "cvt.rni.f32.f32":  # to the nearest integer, ties to even (registers hold fp32 bits)
            regs[dst] = int(np.rint(np.array([val(args[0])], np.uint32).view(np.float32)).view(np.uint32)[0])
        else:
            raise NotImplementedError(f"PTX op {op!r} in {line!r}: teach run_ptx its semantics")
    return regs


# Every byte value in every byte position of the input word.
WORDS = [i | ((i * 7 + 85) % 256) << 8 | ((i * 13 + 170) % 256) << 16 | ((255 - i) << 24) for i in range(256)]


def _expected(word: int, signed: bool) -> tuple[list[int], list[int]]:
    """The codes of the 4 packed bytes: low nibbles (codes 2j) and high nibbles (codes 2j+1)."""
    lo = [b & 0xF for b in _bytes(word)]
    hi = [b >> 4 for b in _bytes(word)]
    if signed:
        lo, hi = [c - 16 if c >= 8 else c for c in lo], [c - 16 if c >= 8 else c for c in hi]
    return lo, hi


def _codes(word: int, dtype: torch.dtype) -> list:
    """The 4 bytes of an output word read as FP8 E4M3 or INT8 codes."""
    return torch.tensor(_bytes(word), dtype=torch.uint8).view(dtype).float().tolist()


# Each conversion program, signed and unsigned, and the dtype its output bytes hold.
PROGRAMS = [("_F8_ASM_SIGNED", True, torch.float8_e4m3fn), ("_F8_ASM_UNSIGNED", False, torch.float8_e4m3fn),
            ("_I8_ASM_SIGNED", True, torch.int8), ("_I8_ASM_UNSIGNED", False, torch.int8)]


@pytest.mark.parametrize("program,signed,dtype", PROGRAMS)
def test_conversion_ptx_gives_the_exact_codes_evens_then_odds(program, signed, dtype):
    """FP8: exact E4M3 values of the codes; INT8: each nibble sign-extended (signed) or zero-extended."""
    asm = getattr(kw, program).value
    for word in WORDS:
        regs = run_ptx(asm, {"$2": word})
        assert (_codes(regs["$0"], dtype), _codes(regs["$1"], dtype)) == _expected(word, signed), hex(word)


def test_the_interpreter_checks_what_it_claims():
    """A wrong selector or LUT must fail: the same program with an odd-code selector swapped is wrong."""
    broken = kw._F8_ASM_SIGNED.value.replace("0x5140", "0x7362", 1)
    regs = run_ptx(broken, {"$2": WORDS[37]})
    lo, _ = _expected(WORDS[37], True)
    assert _codes(regs["$0"], torch.float8_e4m3fn) != lo
    assert _lop3(0xF0, 0xCC, 0xAA, 0x6A) == 0x6A  # the LUT convention: F(a=0xF0, b=0xCC, c=0xAA)
    assert _prmt(0x44332211, 0x88776655, 0x8F40) == 0x00FF5511  # bytes a0, b0, sign of b3, sign of a0


def test_activation_rounding_ptx_is_torch_round_at_ties():
    """The activation kernel rounds q = x̂·(1/s) with one cvt.rni: ties to even, like torch.round."""
    q = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 6.5, 7.5, -7.5, 2.4999998, 3.0000002, 14.5, -0.0])
    out = [run_ptx(kw._RINT_ASM.value, {"$1": b & MASK})["$0"] for b in q.view(torch.int32).tolist()]
    assert torch.equal(torch.tensor(out, dtype=torch.int64).to(torch.int32).view(torch.float32), torch.round(q))
