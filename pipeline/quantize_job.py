"""The quantize job: 16-bit model + calibration prompts -> svdq-*.safetensors + per-layer report.

`python -m pipeline.quantize_job [overrides]` (console script `svdq-quantize`), configured by
conf/quantize.yaml with the same model/quantization/sampler groups as a run. Calibration runs
`quantization.calibration.num_prompts` prompts from `quantization.calibration.manifest` through the
16-bit pipeline for `steps` denoising steps each and records every target layer's inputs at
every step.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipeline.cli import CONF_DIR, exit_on_user_error, run_entry
from pipeline.config import to_run_config
from pipeline.config.schema import RunConfig
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")


def quantize_model_to_file(cfg: RunConfig, out_dir: Path) -> dict:
    """Calibrate, quantize and save; returns the report (also written next to the file)."""
    from pipeline.models import build_pipeline
    from pipeline.outputs.atomic import atomic_write_json
    from pipeline.quantization import SVDQuantConfig, module_bytes, quantize_
    from pipeline.quantization.apply import _dtype16, _log_layer, calibrate
    from pipeline.quantization.checkpoint import default_naming, file_name, save_checkpoint
    from pipeline.runner import config_dict

    q = cfg.quantization
    precision = q.precision.value if q.precision else "int4"
    rank = q.rank if q.rank is not None else 32
    unsigned = q.act_unsigned if q.act_unsigned is not None else precision == "int4"
    start = time.perf_counter()
    pipe, device, _ = build_pipeline(cfg.model, cfg.sampler)
    before = module_bytes(pipe.transformer)
    rec = cfg.model.recommended
    stats = calibrate(pipe, cfg, cfg.sampler.height or rec.height, cfg.sampler.width or rec.width,
                      cfg.sampler.max_sequence_length or rec.max_sequence_length)
    dtype16 = _dtype16(pipe.transformer)
    log.info("quantizing %s: SVDQuant %s r%d (act_unsigned=%s)", cfg.model.name, precision, rank, unsigned)
    reports = quantize_(pipe.transformer, SVDQuantConfig(precision, rank, unsigned, list(q.calibration.alphas), dtype16),
                        stats, on_layer=_log_layer)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / file_name(precision, rank, cfg.model.name)
    naming = q.naming or default_naming(cfg.model.family)
    save_checkpoint(pipe.transformer, path, precision=precision, rank=rank, act_unsigned=unsigned,
                    model_name=cfg.model.name, naming=naming, dtype16=dtype16)
    errors = [r.rel_error for r in reports]
    report = {
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "model": cfg.model.name,
        "precision": precision,
        "rank": rank,
        "act_unsigned": unsigned,
        "naming": naming,
        "calibration": config_dict(cfg)["quantization"]["calibration"],
        "transformer_bytes_16bit": before,
        "transformer_bytes_quantized": module_bytes(pipe.transformer),
        "layer_error_mean": sum(errors) / len(errors),
        "layer_error_max": max(errors),
        "layers": [r.to_dict() for r in reports],
        "time_s": round(time.perf_counter() - start, 3),
    }
    atomic_write_json(path.with_name(path.name.removesuffix(".safetensors") + "-report.json"), report)
    log.info("wrote %s (%.1f MiB; mean layer error %.4f, max %.4f)", path, report["file_bytes"] / 2**20,
             report["layer_error_mean"], report["layer_error_max"])
    return report


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="quantize")
def hydra_quantize(cfg: DictConfig) -> dict:
    try:
        run = to_run_config(cfg)
        out = Path(run.quantization.output or HydraConfig.get().runtime.output_dir)
        return quantize_model_to_file(run, out)
    except PipelineError as e:
        exit_on_user_error(e)


def main() -> None:
    run_entry(hydra_quantize)


if __name__ == "__main__":
    main()
