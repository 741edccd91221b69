"""Run one job: manifest -> image tasks -> (resume check) -> model -> batches -> files on disk.

Order matters for safety: everything that can be wrong with the config or the manifest is found
before the model is built; each image's PNG and sidecar are written atomically before its index
line; run.json is rewritten at the start and the end, so a killed run says `running` and a rerun
into the same folder makes exactly the missing images.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.config.schema import OnError, RunConfig
from pipeline.errors import ManifestError
from pipeline.manifest import PROJECT_ROOT, Manifest, read_manifest, resolve_manifest_path
from pipeline.loading import check_reference_available, load_models
from pipeline.models import resolve_device, resolve_dtype
from pipeline.models.memory import Workload
from pipeline.outputs.atomic import append_line, atomic_write_bytes, atomic_write_json, remove_stale_temp_files
from pipeline.outputs.grid import write_grid
from pipeline.outputs.images import read_sidecar, write_image
from pipeline.progress import progress
from pipeline.quantization import QuantPlan, reconcile, resolve_plan
from pipeline.quantization.file_info import CheckpointInfo
from pipeline.runinfo import PeakMemory, Stopwatch, device_name, git_commit, package_versions
from pipeline.tasks import ImageTask, batches, expand, run_identity

log = logging.getLogger("pipeline")
RUN_FILE, INDEX_FILE, GRID_FILE = "run.json", "index.jsonl", "grid.png"


def load_manifest(cfg: RunConfig) -> Manifest:
    """Read and check the whole manifest; with on_error=abort any bad row stops the run here."""
    manifest = read_manifest(resolve_manifest_path(cfg.job.manifest), cfg.job.limit)
    _check_rows_against_model(manifest, cfg)
    if manifest.problems and cfg.job.on_error == OnError.abort:
        raise ManifestError(
            manifest.path,
            [str(p) for p in manifest.problems],
            hint="Nothing was generated. Fix these rows, or run with job.on_error=skip to generate "
            "the valid rows and record the bad ones in run.json.",
        )
    for p in manifest.problems:
        log.warning("skipping row: %s", p)
    return manifest


def plan_quantization(cfg: RunConfig) -> tuple[QuantPlan, Optional[CheckpointInfo]]:
    """The quantization plan, checked against the weight file's name, header and tensors and against the model it
    is to run in (no weights loaded); with the file's description."""
    plan = resolve_plan(cfg.quantization, cfg.model.source)
    info = None
    if plan.enabled and plan.path:
        from pipeline.models.quantized import check_file_fits
        from pipeline.quantization.file_info import inspect_checkpoint

        info = inspect_checkpoint(plan.path)
        plan = reconcile(plan, info, cfg.quantization.force)
        check_file_fits(cfg.model, info)
    if plan.enabled:
        check_reference_available(cfg)
    return plan, info


def _check_rows_against_model(manifest: Manifest, cfg: RunConfig) -> None:
    """Row values that are fine in general but not for this model become row problems too."""
    from pipeline.manifest import RowProblem

    least = cfg.model.recommended.min_steps
    bad = [r for r in manifest.rows if r.steps is not None and r.steps < least]
    for r in bad:
        manifest.problems.append(RowProblem(str(manifest.path), r.line, "steps",
                                            f"{cfg.model.name} needs at least {least} steps, got {r.steps}"))
    manifest.rows = [r for r in manifest.rows if r not in bad]
    manifest.problems.sort(key=lambda p: p.line)


@dataclass
class RunState:
    """What run.json says; rewritten atomically whenever it changes in a way worth keeping."""

    out_dir: Path
    record: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        atomic_write_json(self.out_dir / RUN_FILE, self.record)


def run_job(cfg: RunConfig, out_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Generate every image of the job into `out_dir` (skipping finished ones); return run.json's dict."""
    clock = Stopwatch()
    manifest = load_manifest(cfg)
    plan, info = plan_quantization(cfg)
    for note in plan.notes:
        log.info("quantization: %s", note)
    device = resolve_device(cfg.sampler.device)
    dtype = resolve_dtype(cfg.sampler.dtype, device)
    tasks = list(expand(manifest.rows, cfg, run_identity(cfg, plan, str(dtype))))

    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir)
    done, pending = _partition(tasks, out_dir, cfg.job.overwrite)
    _index_finished(out_dir, done)

    state = RunState(out_dir)
    state.record = _initial_record(cfg, manifest, plan, device, dtype, out_dir, overrides)
    state.record["counts"].update(planned=len(tasks), skipped_existing=len(done))
    state.save()
    if done:
        log.info("resume: %d of %d images already in %s", len(done), len(tasks), out_dir)

    try:
        if pending:
            _generate_all(cfg, plan, info, pending, state, largest_call(pending, cfg.job.batch_size, dtype.itemsize))
        _finish(cfg, tasks, state, clock, status="complete")
    except KeyboardInterrupt:
        _finish(cfg, tasks, state, clock, status="interrupted")
        log.warning("interrupted: rerun with the same output folder to finish (%s)", out_dir)
        raise
    except Exception as e:
        state.record["error"] = f"{type(e).__name__}: {e}"
        if getattr(e, "record", None) is not None:  # the kernel self-check's findings (quantization.strict)
            state.record["quantization"]["kernel_check"] = e.record
        _finish(cfg, tasks, state, clock, status="failed")
        raise
    return state.record


def _partition(tasks: list[ImageTask], out_dir: Path, overwrite: bool):
    done, pending = [], []
    for t in tasks:
        side = None if overwrite else read_sidecar(out_dir, t.stem)
        (done if side and side.get("settings_hash") == t.settings_hash else pending).append(t)
    return done, pending


def _index_finished(out_dir: Path, done: list[ImageTask]) -> None:
    """Repair index.jsonl after a crash: drop a cut-off last line, add finished images it lacks."""
    index = out_dir / INDEX_FILE
    have, kept, damaged = set(), [], False
    if index.exists():
        for line in index.read_text().splitlines():
            try:
                have.add(json.loads(line)["file"])
                kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                damaged = True  # a line cut by a crash; its image is re-indexed below
        if damaged or not index.read_bytes().endswith(b"\n") and kept:
            atomic_write_bytes(index, "".join(f"{line}\n" for line in kept).encode())
    for t in done:
        if f"{t.stem}.png" not in have:
            side = read_sidecar(out_dir, t.stem)
            append_line(index, json.dumps(_index_line(side), sort_keys=True))


def _index_line(sidecar: dict[str, Any]) -> dict[str, Any]:
    keys = ("file", "id", "row_index", "seed", "prompt", "steps", "height", "width", "settings_hash", "time_s")
    return {k: sidecar.get(k) for k in keys}


def _generate_all(cfg: RunConfig, plan: QuantPlan, info: Optional[CheckpointInfo], pending: list[ImageTask],
                  state: RunState, work: Workload) -> None:
    rec = state.record
    load = Stopwatch()
    models = load_models(cfg, plan, info, work)
    pipe, device = models.pipe, models.device
    rec["quantization"]["summary"] = models.summary.to_dict()
    rec["placement"] = models.placement.to_dict()
    if models.kernel_check is not None:
        rec["quantization"]["kernel_check"] = models.kernel_check
    rec["timing"]["model_load_s"] = round(load.elapsed(), 4)
    state.save()
    memory = PeakMemory(device)
    with memory, progress(len(pending), cfg.job.progress) as bar:
        for batch in batches(pending, cfg.job.batch_size):
            clock = Stopwatch()
            try:
                images = generate_batch(pipe, cfg.model.family, batch)
            except Exception as e:
                if cfg.job.on_error == OnError.abort:
                    raise
                reason = f"{type(e).__name__}: {e}"
                log.error("batch of %d failed: %s", len(batch), reason)
                rec["failed"] += [{"file": f"{t.stem}.png", "line": t.row.line, "reason": reason} for t in batch]
                rec["counts"]["failed"] += len(batch)
                bar.advance(len(batch), "failed")
                continue
            per_image = clock.elapsed() / len(batch)
            psnrs = (_compare(models, cfg.model.family, batch, images, rec) if models.reference is not None
                     else [None] * len(batch))
            for task, image, psnr in zip(batch, images, psnrs):
                _save(cfg, plan, task, image, per_image, len(batch), state, device, psnr)
            bar.advance(len(batch), batch[-1].stem)
            state.save()
    rec["memory"] = memory.to_dict()
    values = [i["psnr_vs_unquantized"] for i in rec["images"] if i.get("psnr_vs_unquantized") is not None]
    if values:
        rec["quality"] = {"psnr_vs_unquantized_mean": round(sum(values) / len(values), 3),
                          "psnr_vs_unquantized_min": round(min(values), 3), "images": len(values)}


def psnr(a, b) -> float:
    """PSNR in dB between two 8-bit images (inf when identical)."""
    import numpy as np

    x, y = (np.asarray(i.convert("RGB"), dtype=np.float64) for i in (a, b))
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else round(10 * np.log10(255.0**2 / mse), 3)


def _compare(models, family: str, batch: list[ImageTask], images, rec: dict[str, Any]) -> list[float]:
    """Render the same batch with the 16-bit transformer (same seeds) and measure PSNR against it. The 16-bit
    transformer waits in host memory; the quantized one leaves the device while it renders (never both there)."""
    from pipeline.models.placement import swapped_transformer

    with swapped_transformer(models.pipe, models.reference, models.placement, models.device) as where:
        rec.setdefault("reference_placement", where.to_dict())
        reference = generate_batch(models.pipe, family, batch)
    return [psnr(a, b) for a, b in zip(images, reference)]


def largest_call(pending: list[ImageTask], batch_size: int, dtype_bytes: int) -> Workload:
    """The biggest pipeline call the run will make: what device memory is estimated for."""
    return Workload(min(batch_size, max(1, len(pending))), max((t.height for t in pending), default=16),
                    max((t.width for t in pending), default=16),
                    max((t.max_sequence_length for t in pending), default=1), dtype_bytes)


def generate_batch(pipe, family: str, batch: list[ImageTask]):
    """One pipeline call for tasks sharing a batch key; each image has its own seeded generator."""
    t = batch[0]
    kwargs: dict[str, Any] = dict(
        prompt=[x.prompt for x in batch],
        num_inference_steps=t.steps,
        height=t.height,
        width=t.width,
        max_sequence_length=t.max_sequence_length,
        true_cfg_scale=t.true_cfg_scale,
        # CPU generators: the same latents whatever the device, so CPU and GPU runs compare.
        generator=[torch.Generator("cpu").manual_seed(x.seed) for x in batch],
        output_type="pil",
    )
    if t.true_cfg_scale > 1:
        kwargs["negative_prompt"] = [x.negative_prompt or " " for x in batch]
    if family == "flux" or pipe.transformer.config.get("guidance_embeds"):
        kwargs["guidance_scale"] = t.guidance
    with torch.inference_mode():
        return pipe(**kwargs).images


def _save(cfg: RunConfig, plan: QuantPlan, task: ImageTask, image, time_s: float, batch_size: int,
          state: RunState, device: torch.device, psnr_db: float | None = None) -> None:
    rec = state.record
    params = {
        **task.params(),
        "model": cfg.model.name,
        "scheduler": cfg.sampler.scheduler.name.value,
        "quantization": {k: getattr(plan, k) for k in ("enabled", "precision", "rank", "act_unsigned", "decided_by")},
        "settings_hash": task.settings_hash,
    }
    sidecar = {
        "file": f"{task.stem}.png",
        "id": task.row.id,
        "row_index": task.row.index,
        "manifest_line": task.row.line,
        "image_number": task.number,
        **params,
        "model_family": cfg.model.family,
        "quantization": {**plan.to_dict(), "summary": rec["quantization"].get("summary")},
        "dtype": rec["dtype"],
        "device": rec["device"],
        "tags": task.row.tags,
        "time_s": round(time_s, 4),
        "batch_size": batch_size,
    }
    if psnr_db is not None:
        sidecar["psnr_vs_unquantized"] = psnr_db
    write_image(state.out_dir, task.stem, image, params, sidecar, embed=cfg.job.png_metadata)
    append_line(state.out_dir / INDEX_FILE, json.dumps(_index_line(sidecar), sort_keys=True))
    rec["images"].append({"file": sidecar["file"], "time_s": sidecar["time_s"],
                          **({"psnr_vs_unquantized": psnr_db} if psnr_db is not None else {})})
    rec["counts"]["made"] += 1


def _initial_record(cfg, manifest, plan, device, dtype, out_dir, overrides) -> dict[str, Any]:
    previous = []
    old_path = out_dir / RUN_FILE
    if old_path.exists():
        try:
            old = json.loads(old_path.read_text())
            previous = old.get("previous_runs", []) + [
                {k: old.get(k) for k in ("status", "started_at", "finished_at", "counts")}
            ]
        except json.JSONDecodeError:
            previous = []
    return {
        "status": "running",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "finished_at": None,
        "output_dir": str(out_dir),
        "command": sys.argv,
        "overrides": overrides or [],
        "config": config_dict(cfg),
        "manifest": {
            "path": str(manifest.path),
            "format": manifest.format,
            "sha256": manifest.sha256,
            "rows_total": manifest.total_rows,
            "rows_valid": len(manifest.rows),
        },
        "model": {"name": cfg.model.name, "family": cfg.model.family, "source": cfg.model.source.value},
        "quantization": {"plan": plan.to_dict()},
        "versions": package_versions(),
        "git_commit": git_commit(PROJECT_ROOT),
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "counts": {"planned": 0, "made": 0, "skipped_existing": 0, "failed": 0, "skipped_rows": len(manifest.problems)},
        "skipped_rows": [
            {"file": p.path, "line": p.line, "field": p.field, "reason": p.message} for p in manifest.problems
        ],
        "failed": [],
        "images": [],
        "timing": {},
        "memory": {},
        "previous_runs": previous,
    }


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The fully resolved config as plain JSON-able data."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def _finish(cfg: RunConfig, tasks: list[ImageTask], state: RunState, clock: Stopwatch, status: str) -> None:
    rec = state.record
    times = [i["time_s"] for i in rec["images"]]
    rec["timing"].update(
        total_s=round(clock.elapsed(), 4),
        generate_s=round(sum(times), 4),
        per_image_mean_s=round(sum(times) / len(times), 4) if times else None,
    )
    if cfg.job.grid and status == "complete":
        finished = [state.out_dir / f"{t.stem}.png" for t in tasks if (state.out_dir / f"{t.stem}.png").exists()]
        if write_grid(finished, state.out_dir / GRID_FILE, cfg.job.grid_max_images):
            rec["grid"] = GRID_FILE
    rec["status"] = status
    rec["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    state.save()
