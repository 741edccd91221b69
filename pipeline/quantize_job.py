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

from pipeline.cli import CONF_DIR, exit_on_interrupt, exit_on_user_error, run_entry
from pipeline.config import to_run_config
from pipeline.config.schema import RunConfig
from pipeline.errors import PipelineError, RunInterrupted

log = logging.getLogger("pipeline")


def _loras_to_bake(cfg):
    """quantize.bake_loras=true: model.loras, read and checked against the model (pipeline/lora/run.py). LoRAs set
    without it are refused rather than silently left out of the file."""
    from pipeline.errors import ConfigError
    from pipeline.lora.run import RunLoras

    if cfg.model.loras and not cfg.quantize.bake_loras:
        raise ConfigError([("model.loras", "the quantize job writes the model without LoRAs unless "
                            "quantize.bake_loras=true merges them into the 16-bit weights first; or drop model.loras "
                            "here and give them to the runs (they work on the 4-bit file)")])
    return RunLoras.prepare(cfg, [None]) if cfg.quantize.bake_loras else RunLoras({}, [])


def quantize_model_to_file(cfg: RunConfig, out_dir: Path) -> dict:
    """Calibrate, quantize and save; returns the report (also written next to the file).

    `out_dir` is a folder (the file gets its standard name svdq-{int4|fp4}_r{rank}-<model>.safetensors there),
    or, when it ends with `.safetensors`, the file itself (its folders are made; the report goes next to it
    as <stem>-report.json)."""
    from pipeline.models import build_pipeline
    from pipeline.outputs.atomic import atomic_write_json
    from pipeline.progress import ItemLog
    from pipeline.quantization import SVDQuantConfig, module_bytes, quantize_
    from pipeline.quantization.apply import _dtype16, calibrate
    from pipeline.families import family
    from pipeline.quantization.checkpoint import default_naming, file_name, save_checkpoint
    from pipeline.quantization.plan import parse_weight_filename
    from pipeline.record import config_dict

    def output_file(out: Path, precision: str, rank: int, model_name: str) -> Path:
        """Where the quantized file goes: `out` itself if it names a .safetensors file (warning when its name does
        not say svdq-{int4|fp4}_r{rank}, which runs read precision and rank from), else the standard name in `out`."""
        out = Path(out)
        if not out.name.lower().endswith(".safetensors"):
            return out / file_name(precision, rank, model_name)
        said = parse_weight_filename(out.name)
        if said is None or (said["precision"], said["rank"]) != (precision, rank):
            standard = file_name(precision, rank, model_name)
            token = standard.split("-")[1]
            log.warning("quantization.output=%s: the file name does not contain 'svdq-%s', so a run with "
                        "quantization.path pointing at it cannot tell precision and rank from the name (auto mode "
                        "refuses it, or needs quantization=manual quantization.precision=%s quantization.rank=%d). "
                        "Name it like %s, or give a folder to get that name.",
                        out, token, precision, rank, standard)
        return out

    q = cfg.quantization
    precision = q.precision.value if q.precision else "int4"
    rank = q.rank if q.rank is not None else 32
    unsigned = q.act_unsigned if q.act_unsigned is not None else precision == "int4"
    path = output_file(out_dir, precision, rank, cfg.model.name)  # warns now, not after minutes of work
    baked = _loras_to_bake(cfg)  # read and checked before the model loads
    start = time.perf_counter()
    pipe, device, _ = build_pipeline(cfg.model, cfg.sampler)
    if baked.used:  # merged into the 16-bit weights: calibration and quantization see the model with them
        baked.use(baked.sets[0], pipe.transformer, reversible=False)
    before = module_bytes(pipe.transformer)
    rec = cfg.model.recommended
    stats = calibrate(pipe, cfg, cfg.sampler.height or rec.height, cfg.sampler.width or rec.width,
                      cfg.sampler.max_sequence_length or rec.max_sequence_length)
    dtype16 = _dtype16(pipe.transformer)
    log.info("quantizing %s: SVDQuant %s r%d (act_unsigned=%s)", cfg.model.name, precision, rank, unsigned)
    lines = ItemLog(0, emit=log.info)

    def on_layer(i: int, n: int, r) -> None:  # `[3/20] layer NAME 64x192 rel.err 0.0123  (1.2 s, ETA 6 s)`
        lines.total = n
        lines(f"layer {r.name} {'x'.join(map(str, r.shape))} rel.err {r.rel_error:.4f}"
              + (f" alpha {r.alpha}" if r.alpha is not None else ""))

    reports = quantize_(pipe.transformer, SVDQuantConfig(precision, rank, unsigned, list(q.calibration.alphas), dtype16),
                        stats, on_layer=on_layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    naming = q.naming or default_naming(family(cfg.model.family).architecture)
    save_checkpoint(pipe.transformer, path, precision=precision, rank=rank, act_unsigned=unsigned,
                    model_name=cfg.model.name, naming=naming, dtype16=dtype16,
                    extra={"baked_loras": [r.to_dict() for r in baked.sets[0]]} if baked.used else None)
    errors = [r.rel_error for r in reports]
    report = {
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "model": cfg.model.name,
        "precision": precision,
        "rank": rank,
        "act_unsigned": unsigned,
        "naming": naming,
        **({"baked_loras": [r.to_dict() for r in baked.sets[0]]} if baked.used else {}),
        "calibration": config_dict(cfg)["quantization"]["calibration"],
        "transformer_bytes_16bit": before,
        "transformer_bytes_quantized": module_bytes(pipe.transformer),
        "layer_error_mean": sum(errors) / len(errors),
        "layer_error_max": max(errors),
        "layers": [r.to_dict() for r in reports],
        "time_s": round(time.perf_counter() - start, 3),
    }
    atomic_write_json(path.with_name(path.name[: -len(".safetensors")] + "-report.json"), report)
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
    except RunInterrupted as e:
        exit_on_interrupt(e)


def main() -> None:
    run_entry(hydra_quantize, config_name="quantize")


if __name__ == "__main__":
    main()
