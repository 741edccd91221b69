"""The calls that turn a loaded diffusers transformer into its SVDQuant form.

Like torchao's `quantize_(model, config)`: `quantize_(transformer, config, stats)` quantizes in
place from calibration statistics; `load_quantized_(transformer, path)` loads a Nunchaku file into
it (a run builds its transformer straight from the file instead: pipeline/models/quantized.py);
`quantize_in_process(pipe, plan, ...)` calibrates and quantizes a run's 16-bit transformer.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from pipeline.quantization.plan import QuantPlan

log = logging.getLogger("pipeline")


@dataclass
class SVDQuantConfig:
    precision: str = "int4"
    rank: int = 32
    act_unsigned: bool = True
    alphas: Optional[list[float]] = None
    dtype16: torch.dtype = torch.bfloat16


@dataclass
class QuantSummary:
    applied: bool
    layers_swapped: int
    bytes_before: int
    bytes_after: int
    precision: str | None
    rank: int | None
    act_unsigned: bool | None
    backend: str
    source: str = "none"  # none | file | calibrated
    notes: list[str] = field(default_factory=list)
    layer_error_mean: Optional[float] = None
    layer_error_max: Optional[float] = None
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def module_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters and buffers hold (4-bit codes are held two per byte)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() in seen:
            continue  # fused parts share their input-side tensors
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def quantize_(transformer: nn.Module, config: SVDQuantConfig, stats, on_layer=None):
    """Quantize every SVDQuant target of `transformer` in place; returns per-layer reports."""
    from pipeline.quantization.targets import targets_for
    from pipeline.quantization.transform import quantize_model

    return quantize_model(transformer, targets_for(transformer), stats, precision=config.precision,
                          rank=config.rank, act_unsigned=config.act_unsigned, alphas=config.alphas,
                          dtype16=config.dtype16, on_layer=on_layer)


def load_quantized_(transformer: nn.Module, path, act_unsigned: Optional[bool] = None):
    """Load a Nunchaku-format file into `transformer` in place; returns (CheckpointInfo, layer names)."""
    from pipeline.quantization.checkpoint import load_checkpoint
    from pipeline.quantization.file_info import inspect_checkpoint

    info = inspect_checkpoint(path)
    unsigned = act_unsigned if act_unsigned is not None else (
        info.act_unsigned if info.act_unsigned is not None else info.precision == "int4")
    return info, load_checkpoint(transformer, path, info, act_unsigned=unsigned)


def _log_layer(i: int, n: int, report) -> None:
    log.info("  [%d/%d] %-45s %s  rel.err %.4f%s", i, n, report.name, "x".join(map(str, report.shape)),
             report.rel_error, f"  alpha {report.alpha}" if report.alpha is not None else "")


def calibrate(pipe, cfg, height: int, width: int, max_sequence_length: int):
    """Run the calibration prompts through the 16-bit pipeline and return per-layer input statistics."""
    from pipeline.manifest import read_manifest, resolve_manifest_path
    from pipeline.quantization.calibration import CalibrationSettings, collect_stats
    from pipeline.quantization.targets import targets_for

    c = cfg.quantization.calibration
    manifest = read_manifest(resolve_manifest_path(c.manifest), limit=c.num_prompts)
    prompts = [r.prompt for r in manifest.rows]
    if not prompts:
        from pipeline.errors import QuantizationError

        raise QuantizationError(f"quantization.calibration.manifest={c.manifest} has no usable prompts")
    from pipeline.families import family

    fam = family(cfg.model.family)
    h, w = c.height or height, c.width or width
    settings = CalibrationSettings(prompts=prompts, steps=c.steps, height=h, width=w, max_rows=c.max_rows,
                                   batch_size=min(c.batch_size, fam.max_batch or c.batch_size), seed=c.seed,
                                   max_sequence_length=max_sequence_length,
                                   call_kwargs=fam.calibration_kwargs(pipe, h, w))
    log.info("calibrating: %d prompts x %d steps at %dx%d (%s)", len(prompts), c.steps, settings.width,
             settings.height, manifest.path)
    # one line per denoising step (one transformer call each: calibration runs without CFG)
    from pipeline.progress import ItemLog

    n_batches = -(-len(prompts) // settings.batch_size)
    lines = ItemLog(n_batches * c.steps, emit=log.info)

    def step_done(module, args, output) -> None:
        if lines.done < lines.total:
            batch, step = divmod(lines.done, c.steps)
            lines(f"calibration: prompt batch {batch + 1}/{n_batches}, step {step + 1}/{c.steps}")

    handle = pipe.transformer.register_forward_hook(step_done)
    try:
        return collect_stats(pipe, targets_for(pipe.transformer), settings)
    finally:
        handle.remove()


def quantize_in_process(pipe, plan: QuantPlan, cfg, summary: "QuantSummary") -> None:
    """Calibrate on the 16-bit pipeline, then quantize its transformer in place; fills `summary`."""
    rec = cfg.model.recommended
    stats = calibrate(pipe, cfg, cfg.sampler.height or rec.height, cfg.sampler.width or rec.width,
                      cfg.sampler.max_sequence_length or rec.max_sequence_length)
    config = SVDQuantConfig(plan.precision, plan.rank, bool(plan.act_unsigned),
                            list(cfg.quantization.calibration.alphas), _dtype16(pipe.transformer))
    log.info("quantizing %s transformer: SVDQuant %s r%d", cfg.model.name, plan.precision, plan.rank)
    reports = quantize_(pipe.transformer, config, stats, on_layer=_log_layer)
    errors = [r.rel_error for r in reports]
    summary.layers_swapped, summary.source = len(reports), "calibrated"
    summary.layer_error_mean = round(sum(errors) / len(errors), 6)
    summary.layer_error_max = round(max(errors), 6)
    summary.layers = [r.to_dict() for r in reports]


def _dtype16(transformer: nn.Module) -> torch.dtype:
    """Storage dtype of the 16-bit branch: the model's if it is 16-bit, else bfloat16 (as Nunchaku's files)."""
    dtype = next(transformer.parameters()).dtype
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def load_with_engine(path: str, architecture: str, device: torch.device):
    """The real Nunchaku engine's own loader for an architecture (only reached where that engine is installed)."""
    import nunchaku

    from pipeline.quantization.architecture import architecture as get_architecture

    arch = get_architecture(architecture)
    if arch.engine_class is None or not hasattr(nunchaku, arch.engine_class):
        from pipeline.errors import QuantizationError

        raise QuantizationError(f"the installed Nunchaku engine has no {arch.name} transformer "
                                f"({arch.engine_class or 'none is published'}); use quantization.backend=native")
    return getattr(nunchaku, arch.engine_class).from_pretrained(path).to(device)
