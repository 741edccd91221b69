"""Pick how an SVDQuant layer runs on a device: Triton kernels (and on which tensor cores) or the reference.

INT4: FP8 (e4m3) tensor cores on compute capability 8.9+ (Ada, Hopper, Blackwell), INT8 tensor cores
on 8.0-8.6 (Triton has no INT8 dot for Turing, 7.5: it runs the reference there). NVFP4: emulated on FP16 tensor cores on 8.0+ (E2M1 values and their group products are
exact in fp16/fp32); native FP4 tensor cores (Blackwell) are not used yet, and `describe` says so.
Older GPUs and the CPU run the PyTorch reference. `SVDQ_KERNELS=reference` forces the reference;
`SVDQ_KERNELS=triton` forces the kernels (on CPU with TRITON_INTERPRET=1 Triton's interpreter runs
them: that is how the CPU tests check them; SVDQ_KERNEL_DOT picks fp8 or int8 there).

Per kernel configuration (what the kernels compile differently for: the `*_config` keys below, which each
call site passes), a device can be told to run the reference instead (`disable`): the kernel self-check
(selfcheck.py) does that for a configuration whose kernel disagrees with the reference on this device.
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


def kernel_mode(device: torch.device, precision: str, config: Optional[tuple] = None) -> str:
    """'fp8' | 'int8' | 'fp16' (the Triton kernels' dot type) or 'reference' (also for a disabled config)."""
    if not _triton_runs_on(device) or is_disabled(device, config):
        return "reference"
    if device.type != "cuda":  # the interpreter
        return "fp16" if precision == "nvfp4" else os.environ.get("SVDQ_KERNEL_DOT", "fp8")
    cc = capability(device)
    if precision == "nvfp4":
        return "fp16" if cc >= (8, 0) else "reference"
    if cc >= (8, 9):
        return "fp8"
    return "int8" if cc >= (8, 0) else "reference"  # Triton's INT8 dot needs sm_80's mma


def int4_dot(device: torch.device, config: Optional[tuple] = None) -> Optional[str]:
    """The dot type ('fp8' | 'int8') INT4 layers' fused kernels run on here; None where they do not run."""
    mode = kernel_mode(device, "int4", config)
    return mode if mode in ("fp8", "int8") else None


def awq_kernel(device: torch.device, rows: int, config: Optional[tuple] = None) -> bool:
    """AWQ W4A16 layers with few input rows (the modulation) use the Triton GEMV on CUDA 7.0+."""
    return rows <= AWQ_MAX_ROWS and plain_kernels(device, config)


def plain_kernels(device: torch.device, config: Optional[tuple] = None) -> bool:
    """Kernels without tensor-core dots run on CUDA 7.0+ and in the interpreter: the AWQ GEMV, attention's
    q/k norm + RoPE (triton_rope.py), AdaLN's LayerNorm + modulation (triton_norm.py)."""
    if not _triton_runs_on(device) or is_disabled(device, config):
        return False
    return device.type != "cuda" or capability(device) >= (7, 0)


def why_reference(device: torch.device) -> Optional[str]:
    """Why no kernel runs on this device (a sentence), or None where they may."""
    forced = os.environ.get("SVDQ_KERNELS", "auto")
    if forced == "reference":
        return "SVDQ_KERNELS=reference: every layer runs the PyTorch reference"
    if not _TRITON:
        return "Triton is not installed: every layer runs the PyTorch reference"
    if not _triton_runs_on(device):
        return (f"the kernels run on CUDA GPUs (on the CPU only under SVDQ_KERNELS=triton with TRITON_INTERPRET=1): "
                f"{device.type} runs the PyTorch reference")
    return None


# ---------- configurations run on the reference (the kernel self-check's fallback) ----------

_DISABLED: set[tuple[str, tuple]] = set()  # (device_key, config): checked globally only when non-empty


def device_key(device: torch.device) -> str:
    """'cuda:0', 'cpu': one name per device however it is spelled (torch.device('cuda') is the current one)."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return device.type if device.index is None else f"{device.type}:{device.index}"


def is_disabled(device: torch.device, config: Optional[tuple]) -> bool:
    return bool(_DISABLED) and config is not None and (device_key(device), config) in _DISABLED


def disable(device: torch.device, config: tuple) -> None:
    """Run `config` on the PyTorch reference on this device from now on (a failed self-check)."""
    _DISABLED.add((device_key(device), config))


def enable(config: Optional[tuple] = None) -> None:
    """Run `config` (None: every configuration) on its kernels again, on every device (tests: a process starts with
    none disabled)."""
    if config is None:
        _DISABLED.clear()
    else:
        _DISABLED.difference_update({entry for entry in _DISABLED if entry[1] == config})


def _layer_parts(layer) -> tuple[str, ...]:
    """What a W4A4 layer's kernels compile differently for: signedness and shift of its activations, bias, NVFP4's
    per-channel scales."""
    act = ("unsigned" if layer.act_unsigned else "signed") + ("+shift" if layer.act_shift else "")
    parts = (layer.precision, act, "bias" if layer.bias is not None else "no-bias")
    return (*parts, "channel-scales") if getattr(layer, "wcscales", None) is not None else parts


def _epilogue(residual: bool, gated: bool) -> str:
    if gated:
        return "residual+gated" if residual else "gated"
    return "residual" if residual else "plain"


def w4a4_config(layer, dtype: torch.dtype, residual: bool = False, gated: bool = False) -> tuple:
    """An SVDQuant layer's call: svdq::w4a4_linear with [+ residual] [gated residual] epilogue, x in dtype."""
    return ("w4a4_linear", _layer_parts(layer), _epilogue(residual, gated), dtype)


def joint_config(layers, dtype: torch.dtype) -> tuple:
    """Streams through INT4 layers into one joint tensor (svdq::w4a4_linear_joint: the mapped epilogue)."""
    return ("w4a4_joint", tuple([_layer_parts(m) for m in layers]), dtype)


def gelu_mlp_config(fc1, fc2, dtype: torch.dtype, residual: bool = False, gated: bool = False) -> tuple:
    """An INT4 MLP with GELU and fc2's quantization in fc1's epilogue (svdq::w4a4_gelu_quant, svdq::w4a4_gemm)."""
    return ("gelu_mlp", (_layer_parts(fc1), _layer_parts(fc2)), _epilogue(residual, gated), dtype)


def awq_config(layer, dtype: torch.dtype) -> tuple:
    return ("awq_gemv", "bias" if layer.bias is not None else "no-bias", dtype)


def rope_config(round_normed: bool, paired: bool, weighted: bool, dtype: torch.dtype) -> tuple:
    """svdq::qk_norm_rope: diffusers' RMSNorm (rounds before its weight) or torch's, tables per pair (Qwen-Image)
    or per element (FLUX), norm weights or none."""
    return ("qk_norm_rope", "diffusers-rmsnorm" if round_normed else "torch-rmsnorm",
            "pair-tables" if paired else "element-tables", "weight" if weighted else "no-weight", dtype)


def adaln_config(dtype: torch.dtype) -> tuple:
    return ("adaln_modulate", dtype)


def describe(device: torch.device, precision: str) -> str:
    mode = kernel_mode(device, precision)
    if mode == "reference":
        return "PyTorch reference"
    if mode == "fp16":
        return "Triton W4A4 kernels, NVFP4 emulated on FP16 tensor cores (no native FP4 path yet)"
    return f"Triton W4A4 kernels on {mode.upper()} tensor cores"
