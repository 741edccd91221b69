"""Pick how an INT4 SVDQuant layer runs on a device: Triton kernels or the PyTorch reference.

Triton INT4 kernels: FP8 (e4m3) tensor cores on compute capability 8.9+ (Ada, Hopper, Blackwell),
INT8 tensor cores on 7.5-8.6. NVFP4 and anything else run the reference. `SVDQ_KERNELS=reference`
forces the reference; `SVDQ_KERNELS=triton` forces the kernels (on CPU with TRITON_INTERPRET=1,
Triton's interpreter runs them: that is how the CPU tests check them).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_mode(device: torch.device, precision: str) -> str:
    """'fp8' | 'int8' (Triton kernels with that tensor-core type) | 'reference'."""
    forced = os.environ.get("SVDQ_KERNELS", "auto")
    if precision != "int4" or forced == "reference" or not triton_importable():
        return "reference"
    if device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        if cc >= (8, 9):
            return "fp8"
        return "int8" if cc >= (7, 5) else "reference"
    if forced == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return os.environ.get("SVDQ_KERNEL_DOT", "fp8")
    return "reference"


def describe(device: torch.device, precision: str) -> str:
    mode = kernel_mode(device, precision)
    if mode == "reference":
        return "PyTorch reference"
    return f"Triton W4A4 kernels on {mode.upper()} tensor cores"
