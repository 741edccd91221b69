"""Pick how an SVDQuant layer runs on a device: Triton kernels (and on which tensor cores) or the reference.

INT4: FP8 (e4m3) tensor cores on compute capability 8.9+ (Ada, Hopper, Blackwell), INT8 tensor cores
on 8.0-8.6 (Triton has no INT8 dot for Turing, 7.5: it runs the reference there). NVFP4: emulated on FP16 tensor cores on 8.0+ (E2M1 values and their group products are
exact in fp16/fp32); native FP4 tensor cores (Blackwell) are not used yet, and `describe` says so.
Older GPUs and the CPU run the PyTorch reference. `SVDQ_KERNELS=reference` forces the reference;
`SVDQ_KERNELS=triton` forces the kernels (on CPU with TRITON_INTERPRET=1 Triton's interpreter runs
them: that is how the CPU tests check them; SVDQ_KERNEL_DOT picks fp8 or int8 there).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

_TRITON = importlib.util.find_spec("triton") is not None  # once, at import: compile-friendly
AWQ_MAX_ROWS = 16  # an AWQ layer with more input rows than this dequantizes and runs a GEMM instead


_CAPABILITY: dict[int, tuple[int, int]] = {}


def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability, asked once per GPU: the layers ask on every call."""
    index = device.index
    if index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    if index not in _CAPABILITY:
        _CAPABILITY[index] = tuple(torch.cuda.get_device_capability(index))
    return _CAPABILITY[index]


def _triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels may run here: a GPU, or the CPU under SVDQ_KERNELS=triton + the interpreter."""
    forced = os.environ.get("SVDQ_KERNELS", "auto")
    if forced == "reference" or not _TRITON:
        return False
    return device.type == "cuda" or (forced == "triton" and os.environ.get("TRITON_INTERPRET") == "1")


def kernel_mode(device: torch.device, precision: str) -> str:
    """'fp8' | 'int8' | 'fp16' (the Triton kernels' dot type) or 'reference'."""
    if not _triton_runs_on(device):
        return "reference"
    if device.type != "cuda":  # the interpreter
        return "fp16" if precision == "nvfp4" else os.environ.get("SVDQ_KERNEL_DOT", "fp8")
    cc = capability(device)
    if precision == "nvfp4":
        return "fp16" if cc >= (8, 0) else "reference"
    if cc >= (8, 9):
        return "fp8"
    return "int8" if cc >= (8, 0) else "reference"  # Triton's INT8 dot needs sm_80's mma


def int4_dot(device: torch.device) -> Optional[str]:
    """The dot type ('fp8' | 'int8') INT4 layers' fused kernels run on here; None where they do not run."""
    mode = kernel_mode(device, "int4")
    return mode if mode in ("fp8", "int8") else None


def awq_kernel(device: torch.device, rows: int) -> bool:
    """AWQ W4A16 layers with few input rows (the modulation) use the Triton GEMV on CUDA 7.0+."""
    return rows <= AWQ_MAX_ROWS and plain_kernels(device)


def plain_kernels(device: torch.device) -> bool:
    """Kernels without tensor-core dots run on CUDA 7.0+ and in the interpreter: the AWQ GEMV, attention's
    q/k norm + RoPE (triton_rope.py), AdaLN's LayerNorm + modulation (triton_norm.py)."""
    if not _triton_runs_on(device):
        return False
    return device.type != "cuda" or capability(device) >= (7, 0)


def describe(device: torch.device, precision: str) -> str:
    mode = kernel_mode(device, precision)
    if mode == "reference":
        return "PyTorch reference"
    if mode == "fp16":
        return "Triton W4A4 kernels, NVFP4 emulated on FP16 tensor cores (no native FP4 path yet)"
    return f"Triton W4A4 kernels on {mode.upper()} tensor cores"
