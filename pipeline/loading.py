"""Load what a run generates with, in the order that keeps memory low.

The device memory a run needs is estimated before a real model is loaded (headers and configs only) and a
placement chosen (models/placement.py). The quantized transformer is built from its file before the rest of the
pipeline loads (the 16-bit transformer is never read), the pipeline's other components load around it in host
memory, and only then does anything go to the device, as the placement says. Without a file the 16-bit pipeline
loads as shipped and, if the plan says so, is quantized in place after calibration. The 16-bit transformer that
`job.compare_to_unquantized` renders against waits in host memory.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from pipeline.config.schema import ModelSource, RunConfig
from pipeline.errors import LoraError, ModelNotFoundError
from pipeline.lora.run import RunLoras
from pipeline.models import load_pipeline, resolve_device, resolve_dtype
from pipeline.models.memory import (MemoryEstimate, Workload, component_bytes, estimate_memory, model_dims,
                                    transformer_bytes)
from pipeline.models.placement import Placement, apply_placement, choose_placement
from pipeline.models.quantized import (build_quantized_transformer, transformer_bytes_16bit, transformer_class,
                                       transformer_config)
from pipeline.quantization import QuantPlan, QuantSummary, module_bytes, quantize_in_process
from pipeline.families import family
from pipeline.quantization.apply import load_with_engine
from pipeline.quantization.backend import choose_backend
from pipeline.quantization.file_info import CheckpointInfo

log = logging.getLogger("pipeline")


@dataclass
class LoadedModels:
    pipe: Any
    device: torch.device
    dtype: torch.dtype
    summary: QuantSummary
    placement: Placement
    reference: Optional[nn.Module] = None  # the 16-bit transformer for job.compare_to_unquantized, in host memory
    kernel_check: Optional[dict[str, Any]] = None  # the Triton kernels' self-check (kernels/selfcheck.py)


def load_models(cfg: RunConfig, plan: QuantPlan, info: Optional[CheckpointInfo], work: Workload,
                loras: Optional[RunLoras] = None) -> LoadedModels:
    """The pipeline as the plan wants it, placed on the run's device; `work` is the largest pipeline call the run
    makes (for the memory estimate); `loras`: the run's LoRAs, whose first set goes on before placement."""
    device = resolve_device(cfg.sampler.device)
    dtype = resolve_dtype(cfg.sampler.dtype, device)
    estimate = None if cfg.model.source == ModelSource.tiny else _estimate_before_loading(cfg, plan, info, dtype, work)
    choice = None
    if plan.enabled:
        choice = choose_backend(cfg.quantization.backend, plan.precision, device, bool(plan.path),
                                cfg.quantization.strict)
        for note in choice.notes:
            log.warning("quantization: %s", note)
    summary = QuantSummary(plan.enabled, 0, 0, 0, plan.precision, plan.rank, plan.act_unsigned,
                           backend=choice.name if choice else "none", notes=list(choice.notes) if choice else [])
    transformer, reference = None, None
    if plan.enabled and plan.path:
        summary.source = "file"
        if choice.name == "nunchaku":
            summary.bytes_before = transformer_bytes_16bit(cfg.model, dtype, info)
            transformer = load_with_engine(plan.path, family(cfg.model.family).architecture.name, device)
        else:
            built = build_quantized_transformer(cfg.model, plan.path, info, dtype, bool(plan.act_unsigned))
            transformer = built.transformer
            summary.layers_swapped, summary.bytes_before = len(built.layers), built.bytes_16bit
            log.info("loaded %d SVDQuant layers from %s", len(built.layers), plan.path)
        if cfg.job.compare_to_unquantized:
            reference = load_16bit_transformer(cfg, dtype)
    pipe = load_pipeline(cfg.model, cfg.sampler, dtype, transformer)
    if estimate is None:  # a tiny model: built in-process in no time, measured as built
        estimate = estimate_memory(component_bytes(pipe, dtype), transformer_bytes(pipe.transformer),
                                   model_dims(pipe), work, cfg.model.vae_tiling)
    placement = choose_placement(cfg.model, estimate, device)
    if plan.enabled and not plan.path:  # calibrate on the 16-bit pipeline, on the device, then quantize in place
        summary.bytes_before = module_bytes(pipe.transformer)
        if cfg.job.compare_to_unquantized:
            reference = copy.deepcopy(pipe.transformer).to(dtype=dtype)
        with torch.no_grad():
            pipe.to(device=device, dtype=dtype)
        quantize_in_process(pipe, plan, cfg, summary)
        if device.type != "cpu":
            pipe.to(device=torch.device("cpu"))
    else:
        summary.bytes_before = summary.bytes_before or module_bytes(pipe.transformer)
    kernel_check = None
    if plan.enabled and summary.backend != "nunchaku":  # before placement: each check borrows just its layers
        from pipeline.kernels.selfcheck import self_check

        kernel_check = self_check(pipe.transformer, device, dtype, cfg.quantization.strict)
        log.info("%s", kernel_check["summary"])
    if loras is not None and loras.used:
        if summary.backend == "nunchaku":
            raise LoraError("LoRAs are applied to this project's SVDQuant layers; the Nunchaku engine's transformer "
                            "takes its own LoRA calls. Use quantization.backend=native for a run with LoRAs.")
        loras.check_placement(placement)
        loras.use(loras.sets[0], pipe.transformer, reference)
    apply_placement(pipe, placement, device, dtype)
    summary.bytes_after = module_bytes(pipe.transformer)
    return LoadedModels(pipe, device, dtype, summary, placement, reference, kernel_check)


def _estimate_before_loading(cfg: RunConfig, plan: QuantPlan, info: Optional[CheckpointInfo], dtype: torch.dtype,
                             work: Workload) -> MemoryEstimate:
    """Weights from the model folder's and the quantized file's headers, activations from the workload."""
    from pipeline.models.pretrained import resolve_model_dir

    folder = resolve_model_dir(cfg.model)
    components = component_bytes(folder, dtype)
    components.pop("transformer", None)
    transformer = transformer_bytes(plan.path) if plan.enabled and plan.path else transformer_bytes(
        folder / "transformer", dtype)
    config, _ = transformer_config(cfg.model, info)
    return estimate_memory(components, transformer, model_dims(folder, config), work, cfg.model.vae_tiling)


def check_reference_available(cfg: RunConfig) -> None:
    """job.compare_to_unquantized renders the 16-bit transformer too: say now, before any image, if its weights
    are not on this machine (a quantized file does not need them otherwise)."""
    if cfg.model.source == ModelSource.tiny or not cfg.job.compare_to_unquantized:
        return
    from pipeline.models.pretrained import resolve_model_dir

    folder = resolve_model_dir(cfg.model) / "transformer"
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        repo = cfg.model.hf_id or cfg.model.name
        raise ModelNotFoundError(
            f"job.compare_to_unquantized=true renders each image with the 16-bit transformer too, but {folder} holds "
            f"no transformer weights. Get them with `hf download {repo} --include 'transformer/*'` (on a machine with "
            "internet) or set job.compare_to_unquantized=false.")


def load_16bit_transformer(cfg: RunConfig, dtype: torch.dtype) -> nn.Module:
    """The model's own 16-bit transformer, in host memory (swapped onto the device for the reference pass)."""
    if cfg.model.source == ModelSource.tiny:
        from pipeline.models.tiny import build_tiny

        return build_tiny(cfg.model).transformer.to(dtype=dtype)
    from pipeline.models.pretrained import resolve_model_dir

    folder = resolve_model_dir(cfg.model)
    return transformer_class(cfg.model.family).from_pretrained(folder, subfolder="transformer", dtype=dtype,
                                                               local_files_only=True).eval()
