"""Which engine runs the 4-bit layers on this device, and whether the hardware suits the precision.

Facts (from SGLang's and Nunchaku's support matrices): INT4 tensor-core kernels need compute
capability 7.0+; NVFP4 tensor cores exist on Blackwell (10.x, 12.x) only. Elsewhere our PyTorch
reference runs (exact, slow) with a warning, or the run fails under `quantization.strict=true`.
The real Nunchaku engine is used only when the importable `nunchaku` is that engine: the PyPI
package of the same name is an unrelated library.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass, field

import torch

from pipeline.config.schema import Backend
from pipeline.errors import DeviceError, QuantizationError

log = logging.getLogger("pipeline")


@dataclass
class BackendChoice:
    name: str  # reference | nunchaku
    notes: list[str] = field(default_factory=list)


def engine_markers() -> list[str]:
    """The transformer classes the real engine exports (each architecture's `engine_class`)."""
    from pipeline.quantization.architecture import architectures

    return [a.engine_class for a in architectures() if a.engine_class]


def nunchaku_engine() -> tuple[bool, str]:
    """(usable, why): is the importable `nunchaku` the SVDQuant engine?"""
    if importlib.util.find_spec("nunchaku") is None:
        return False, "no package named nunchaku is installed (the engine ships as wheels from its own releases)"
    try:
        mod = importlib.import_module("nunchaku")
    except Exception as e:  # the real engine fails to import without its CUDA libraries
        return False, f"nunchaku is installed but does not import: {type(e).__name__}: {e}"
    markers = engine_markers()
    if not any(hasattr(mod, m) for m in markers):
        where = getattr(mod, "__file__", "?")
        return False, (f"the installed nunchaku ({where}) is not the SVDQuant engine (it has no {markers[0]}); "
                       "PyPI's 'nunchaku' is an unrelated library: pip uninstall nunchaku, then install the engine's "
                       "wheel from its releases")
    return True, "the Nunchaku SVDQuant engine is installed"


def hardware_notes(precision: str, device: torch.device, strict: bool) -> list[str]:
    """Warn (or fail under strict) where the GPU lacks the tensor cores the precision is made for."""
    if device.type != "cuda":
        return [f"{precision} runs through the PyTorch reference on {device.type} (exact, not fast)"]
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    problem = None
    if precision == "int4" and major < 7:
        problem = f"INT4 kernels need compute capability 7.0 or newer; {name} is {major}.{minor}"
    if precision == "nvfp4" and major not in (10, 12):
        problem = (f"NVFP4 tensor cores are on Blackwell GPUs (compute capability 10.x/12.x); {name} is "
                   f"{major}.{minor}, so NVFP4 is emulated")
    if problem and strict:
        raise DeviceError(f"{problem}. Use quantization.precision=int4 on this GPU, or unset quantization.strict.")
    from pipeline.kernels.dispatch import describe

    notes = [problem] if problem else []
    notes.append(f"{precision} layers run through the {describe(device, precision)} on {name}")
    return notes


def choose_backend(requested: Backend, precision: str, device: torch.device, has_file: bool,
                   strict: bool) -> BackendChoice:
    usable, why = nunchaku_engine()
    if requested == Backend.nunchaku:
        if not usable:
            raise QuantizationError(f"quantization.backend=nunchaku: {why}. Use quantization.backend=native.")
        if device.type != "cuda" or not has_file:
            raise QuantizationError("quantization.backend=nunchaku needs a CUDA device and a quantization.path file")
        return BackendChoice("nunchaku", [why])
    if requested == Backend.auto and usable and device.type == "cuda" and has_file and _engine_supports(precision, device):
        return BackendChoice("nunchaku", [why])
    notes = hardware_notes(precision, device, strict)
    if requested == Backend.auto and importlib.util.find_spec("nunchaku") is not None and not usable:
        notes.append(why)
    return BackendChoice("reference", notes)


def _engine_supports(precision: str, device: torch.device) -> bool:
    """The engine's own matrix: sm_75/80/86/89 INT4; sm_120/121 NVFP4; anything else (sm_90 too) refused."""
    cc = torch.cuda.get_device_capability(device)
    if precision == "int4":
        return cc in ((7, 5), (8, 0), (8, 6), (8, 9))
    return cc[0] == 12
