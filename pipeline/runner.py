"""Run one job: manifest -> image tasks -> (resume check) -> model -> batches -> files on disk.

Order matters for safety: everything that can be wrong with the config or the manifest is found
before the model is built; the output folder is locked for the run (outputs/lock.py), and finished
images made with other settings are refused before the model is built too (outputs/existing.py);
each image's PNG and sidecar are written atomically before its index line; run.json is rewritten at
the start and the end, so a killed run says `running` (the next run into the folder records it as
`killed`) and a rerun into the same folder makes exactly the missing images.

Final statuses (run.json `status`): complete (every planned image is on disk), incomplete (some
batches failed with job.on_error=skip), empty (nothing planned), interrupted (SIGINT/SIGTERM: see
pipeline/interrupt.py; run_job raises RunInterrupted after writing run.json), failed (an exception,
re-raised). run_job never exits the process: the command line maps these to exit statuses.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from pipeline.config.schema import OnError, RunConfig
from pipeline.errors import ManifestError, RunInterrupted
from pipeline.interrupt import Stop, StopSignals, signal_name
from pipeline.manifest import PROJECT_ROOT, Manifest, read_manifest, resolve_manifest_path
from pipeline.loading import check_reference_available, load_models
from pipeline.models import resolve_device, resolve_dtype
from pipeline.models.memory import Workload
from pipeline.models.prompt_limits import truncated_rows
from pipeline.outputs.atomic import atomic_write_json, remove_stale_temp_files
from pipeline.outputs.existing import Index, WouldOverwrite, finished_images, partition
from pipeline.outputs.grid import write_grid
from pipeline.outputs.images import write_image
from pipeline.outputs.lock import FolderLock
from pipeline.progress import progress, step_callback
from pipeline.quantization import QuantPlan, reconcile, resolve_plan
from pipeline.quantization.file_info import CheckpointInfo
from pipeline.runinfo import PeakMemory, Stopwatch, device_name, git_commit, package_versions
from pipeline.tasks import ImageTask, batches, draw_random_seeds, expand, recorded_random_seeds, run_identity

log = logging.getLogger("pipeline")
RUN_FILE, GRID_FILE = "run.json", "grid.png"


def load_manifest(cfg: RunConfig) -> Manifest:
    """Read and check the whole manifest; with on_error=abort any bad row stops the run here."""
    manifest = read_manifest(resolve_manifest_path(cfg.job.manifest), cfg.job.limit, cfg.job.columns)
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
    manifest.bad_rows += len(bad)
    manifest.problems.sort(key=lambda p: p.line)


def skipped_row_count(manifest: Manifest) -> int:
    """Rows skipped, not problems: a row with two problems is one row (a header problem makes every row bad)."""
    return max(manifest.bad_rows, len(manifest.skipped_lines))


@dataclass
class RunState:
    """What run.json says; rewritten atomically whenever it changes in a way worth keeping."""

    out_dir: Path
    index: Index
    record: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        atomic_write_json(self.out_dir / RUN_FILE, self.record)


def run_job(cfg: RunConfig, out_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Generate every image of the job into `out_dir` (skipping finished ones); return run.json's dict.

    Raises PipelineError for what the user can fix (a bad manifest, OutputLocked, WouldOverwrite...), before
    any model is loaded; RunInterrupted after SIGINT/SIGTERM (run.json then says `interrupted`, unless the
    signal came before the run had the folder); any other exception after recording it as `failed`."""
    clock = Stopwatch()
    with StopSignals() as stop:
        lock = FolderLock(out_dir, cfg.job.wait_for_lock)
        try:
            try:
                with stop.immediate():  # nothing written yet: a signal stops the run at once
                    manifest = load_manifest(cfg)
                    plan, info = plan_quantization(cfg)
                    for note in plan.notes:
                        log.info("quantization: %s", note)
                    device = resolve_device(cfg.sampler.device)
                    dtype = resolve_dtype(cfg.sampler.dtype, device)
                    out_dir.mkdir(parents=True, exist_ok=True)
                    lock.acquire()
            except (Stop, KeyboardInterrupt) as e:
                raise RunInterrupted(getattr(e, "signum", signal.SIGINT), out_dir) from None
            record = _run_locked(cfg, manifest, plan, info, device, dtype, out_dir, overrides, stop, clock)
        finally:
            lock.release()
    if stop.unhandled is not None:  # it came while the run wrote its final record: still, stop a sweep here
        raise RunInterrupted(stop.unhandled, out_dir)
    return record


def _run_locked(cfg: RunConfig, manifest: Manifest, plan: QuantPlan, info: Optional[CheckpointInfo],
                device: torch.device, dtype: torch.dtype, out_dir: Path, overrides: list[str] | None,
                stop: StopSignals, clock: Stopwatch) -> dict[str, Any]:
    """The run, holding the folder lock. Signals are acted on at safe points from here on."""
    remove_stale_temp_files(out_dir)  # only now: another run's temp files were in use until we had the lock
    previous_seeds = recorded_random_seeds(out_dir / RUN_FILE)  # seeds an earlier run here drew for -1: reused
    random_seeds = draw_random_seeds(manifest.rows, cfg.sampler.seed, previous_seeds)
    tasks = list(expand(manifest.rows, cfg, run_identity(cfg, plan, str(dtype)), random_seeds=random_seeds))
    finished = finished_images(out_dir)
    part = partition(tasks, finished)
    if part.conflicts and not cfg.job.overwrite:
        raise WouldOverwrite(out_dir, part.conflicts, {**_image_settings(cfg, plan), "dtype": _dtype_name(dtype)})
    state = RunState(out_dir, Index.rebuild(out_dir, finished))
    state.record = _initial_record(cfg, manifest, plan, device, dtype, out_dir, overrides)
    state.record["counts"].update(planned=len(tasks), skipped_existing=len(part.done))
    if random_seeds or previous_seeds:  # kept across reruns, also those of rows this run leaves out
        state.record["random_seeds"] = {**previous_seeds, **random_seeds}
    if random_seeds:
        log.info("random seeds (-1): %s", ", ".join(f"{k}={v}" for k, v in random_seeds.items()))
    if part.conflicts:
        log.warning("job.overwrite=true: replacing %d finished image(s) made with other settings in %s",
                    len(part.conflicts), out_dir)
    state.save()
    if part.done:
        log.info("resume: %d of %d images already in %s", len(part.done), len(tasks), out_dir)

    try:
        if not tasks:
            state.record["reason"] = (f"the manifest has 0 usable rows ({state.record['counts']['skipped_rows']} "
                                      "skipped)")
            log.warning("nothing to generate: %s", state.record["reason"])
            _finish(cfg, tasks, state, clock, status="empty")
            return state.record
        if part.pending:
            _generate_all(cfg, plan, info, part.pending, state, stop,
                          largest_call(part.pending, cfg.job.batch_size, dtype.itemsize))
        stop.check()  # a signal during the last batch's saving: say so rather than `complete`
        counts = state.record["counts"]
        if counts["failed"]:
            state.record["reason"] = (f"{counts['failed']} of {counts['planned']} images failed "
                                      "(job.on_error=skip); rerun the same command to retry them")
            state.record["resume"] = resume_command(overrides, out_dir)
        _finish(cfg, tasks, state, clock, status="incomplete" if counts["failed"] else "complete")
    except (Stop, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", signal.SIGINT)  # KeyboardInterrupt: no handler of ours (not the main thread)
        state.record["signal"] = signal_name(signum)
        state.record["resume"] = resume_command(overrides, out_dir)
        _finish(cfg, tasks, state, clock, status="interrupted")
        c = state.record["counts"]
        log.warning("interrupted by %s: %d image(s) made now, %d of %d on disk; to finish, rerun: %s",
                    signal_name(signum), c["made"], c["made"] + c["skipped_existing"], c["planned"],
                    state.record["resume"])
        interrupted = RunInterrupted(signum, out_dir)
        interrupted.resume = state.record["resume"]  # for the command line, beside run.json's `resume`
        raise interrupted from None
    except Exception as e:
        state.record["error"] = f"{type(e).__name__}: {e}"
        if getattr(e, "record", None) is not None:  # the kernel self-check's findings (quantization.strict)
            state.record["quantization"]["kernel_check"] = e.record
        _finish(cfg, tasks, state, clock, status="failed")
        raise
    return state.record


def resume_command(overrides: list[str] | None, out_dir: Path) -> str:
    """The command that finishes this run: the same overrides, pinned to the same folder."""
    args = list(overrides or [])
    if not any(a.lstrip("+~").split("=", 1)[0] == "job.output_dir" for a in args):
        args.append(f"job.output_dir={Path(out_dir).resolve()}")
    entry = "svdq-batch" if Path(sys.argv[0]).name == "svdq-batch" else "python -m pipeline"
    return f"{entry} {shlex.join(args)}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _image_settings(cfg: RunConfig, plan: QuantPlan) -> dict[str, Any]:
    """The run-wide settings every image's sidecar and PNG metadata record (beside task.params())."""
    return {
        "model": cfg.model.name,
        "scheduler": cfg.sampler.scheduler.name.value,
        "quantization": {k: getattr(plan, k) for k in ("enabled", "precision", "rank", "act_unsigned", "decided_by")},
    }


def _generate_all(cfg: RunConfig, plan: QuantPlan, info: Optional[CheckpointInfo], pending: list[ImageTask],
                  state: RunState, stop: StopSignals, work: Workload) -> None:
    rec = state.record
    load = Stopwatch()
    with stop.immediate():  # loading writes nothing: a signal need not wait for it to end
        models = load_models(cfg, plan, info, work)
    pipe, device = models.pipe, models.device
    rec["quantization"]["summary"] = models.summary.to_dict()
    rec["placement"] = models.placement.to_dict()
    if models.kernel_check is not None:
        rec["quantization"]["kernel_check"] = models.kernel_check
    rec["timing"]["model_load_s"] = round(load.elapsed(), 4)
    truncated = truncated_rows(pipe, cfg.model.family, pending)  # one warning per row that loses tokens
    if truncated:
        rec["prompt_truncated"] = truncated
    state.save()
    memory = PeakMemory(device)
    with memory, progress(len(pending), cfg.job.progress) as bar:
        for batch in batches(pending, cfg.job.batch_size):
            stop.check()
            clock = Stopwatch()
            try:
                steps = step_callback(bar, batch[0].steps, label=batch[0].stem)
                images = generate_batch(pipe, cfg.model.family, batch, on_step=[steps, stop.step_end])
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
            psnrs = (_compare(models, cfg.model.family, batch, images, rec, stop) if models.reference is not None
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


def _compare(models, family: str, batch: list[ImageTask], images, rec: dict[str, Any],
             stop: Optional[StopSignals] = None) -> list[float]:
    """Render the same batch with the 16-bit transformer (same seeds) and measure PSNR against it. The 16-bit
    transformer waits in host memory; the quantized one leaves the device while it renders (never both there)."""
    from pipeline.models.placement import swapped_transformer

    with swapped_transformer(models.pipe, models.reference, models.placement, models.device) as where:
        rec.setdefault("reference_placement", where.to_dict())
        reference = generate_batch(models.pipe, family, batch, on_step=stop.step_end if stop else None)
    return [psnr(a, b) for a, b in zip(images, reference)]


def largest_call(pending: list[ImageTask], batch_size: int, dtype_bytes: int) -> Workload:
    """The biggest pipeline call the run will make: what device memory is estimated for."""
    return Workload(min(batch_size, max(1, len(pending))), max((t.height for t in pending), default=16),
                    max((t.width for t in pending), default=16),
                    max((t.max_sequence_length for t in pending), default=1), dtype_bytes)


StepEnd = Callable[[Any, int, Any, dict], Optional[dict]]  # a diffusers callback_on_step_end


def chain_step_callbacks(callbacks: StepEnd | Sequence[StepEnd | None] | None) -> Optional[StepEnd]:
    """One diffusers `callback_on_step_end` calling each of `callbacks` in turn (each may update the callback
    kwargs it is given; returning None keeps them), or None when there are none."""
    if callbacks is None or callable(callbacks):
        return callbacks
    calls = [c for c in map(chain_step_callbacks, callbacks) if c is not None]  # lists may nest
    if len(calls) <= 1:
        return calls[0] if calls else None

    def chained(pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        for c in calls:
            out = c(pipe, step_index, timestep, callback_kwargs)
            callback_kwargs = callback_kwargs if out is None else out
        return callback_kwargs

    return chained


def generate_batch(pipe, family: str, batch: list[ImageTask], on_step: StepEnd | Sequence[StepEnd | None] | None = None):
    """One pipeline call for tasks sharing a batch key; each image has its own seeded generator.

    `on_step`: diffusers `callback_on_step_end` callable(s) `(pipe, step_index, timestep, callback_kwargs)`, run
    after every denoising step (the stop check raises there; a progress callback can go beside it)."""
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
    callback = chain_step_callbacks(on_step)
    if callback is not None:
        kwargs["callback_on_step_end"] = callback
    with torch.inference_mode():
        return pipe(**kwargs).images


def _save(cfg: RunConfig, plan: QuantPlan, task: ImageTask, image, time_s: float, batch_size: int,
          state: RunState, device: torch.device, psnr_db: float | None = None) -> None:
    rec = state.record
    params = {**task.params(), **_image_settings(cfg, plan), "settings_hash": task.settings_hash}
    sidecar = {
        "file": f"{task.stem}.png",
        "id": task.row.id,
        "row_index": task.row.index,
        "manifest_line": task.row.line,
        "image_number": task.number,
        **params,
        "model_family": cfg.model.family,
        "quantization": {**plan.to_dict(), "summary": _without_layers(rec["quantization"].get("summary"))},
        "dtype": rec["dtype"],
        "device": rec["device"],
        "tags": task.row.tags,
        "time_s": round(time_s, 4),
        "batch_size": batch_size,
    }
    if psnr_db is not None:
        sidecar["psnr_vs_unquantized"] = psnr_db
    if task.row.id in rec.get("prompt_truncated", {}):
        sidecar["prompt_truncated"] = rec["prompt_truncated"][task.row.id]
    write_image(state.out_dir, task.stem, image, params, sidecar, embed=cfg.job.png_metadata)
    if state.index.add(sidecar):  # its line replaced that of the image it replaced (job.overwrite)
        rec["counts"]["replaced"] = rec["counts"].get("replaced", 0) + 1
    rec["images"].append({"file": sidecar["file"], "time_s": sidecar["time_s"],
                          **({"psnr_vs_unquantized": psnr_db} if psnr_db is not None else {})})
    rec["counts"]["made"] += 1


def _previous_runs(out_dir: Path) -> list[dict[str, Any]]:
    """run.json's earlier runs into this folder, the last one added. Called holding the folder lock, so a last run
    that still says `running` is not running any more: it was killed (or crashed, or its machine went down)."""
    try:
        old = json.loads((out_dir / RUN_FILE).read_text())
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        log.warning("%s is unreadable (cut off?): starting a new record of earlier runs", out_dir / RUN_FILE)
        return []
    if not isinstance(old, dict):
        return []
    last = {k: old.get(k) for k in ("status", "started_at", "finished_at", "counts", "pid", "host")}
    if old.get("status") == "running":
        last["status"] = "killed"
        last["killed"] = _why_not_running(old.get("pid"), old.get("host"))
        log.warning("the previous run into %s (pid %s on host %s, started %s) never finished: %s; recorded as "
                    "killed in run.json's previous_runs", out_dir, old.get("pid", "?"), old.get("host", "?"),
                    old.get("started_at", "?"), last["killed"])
    earlier = old.get("previous_runs")
    return (earlier if isinstance(earlier, list) else []) + [last]


def _why_not_running(pid: Any, host: Any) -> str:
    """Why a run whose run.json says `running` is not running (we hold the folder lock it held)."""
    if not isinstance(pid, int) or not host:
        return "it left status `running` and its folder lock is free"
    if host != socket.gethostname():
        return f"it ran on host {host}, and the folder lock it held there is free"
    if pid == os.getpid():
        return "an earlier run in this process stopped without finishing its record"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid} is gone"
    except PermissionError:
        pass
    return f"process {pid} does not hold the folder lock (that pid is another process now)"


def _without_layers(summary: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """A sidecar's quantization summary: the per-layer report (kilobytes) stays in run.json, once."""
    if summary is None:
        return None
    return {k: v for k, v in summary.items() if k != "layers"} | {"layers_in": RUN_FILE}


def _initial_record(cfg, manifest, plan, device, dtype, out_dir, overrides) -> dict[str, Any]:
    return {
        "status": "running",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "finished_at": None,
        "pid": os.getpid(),
        "host": socket.gethostname(),
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
        "dtype": _dtype_name(dtype),
        "counts": {"planned": 0, "made": 0, "skipped_existing": 0, "failed": 0,
                   "skipped_rows": skipped_row_count(manifest)},
        "skipped_rows": [  # every problem, several per row possibly
            {"file": p.path, "line": p.line, "field": p.field, "reason": p.message} for p in manifest.problems
        ],
        "failed": [],
        "images": [],
        "timing": {},
        "memory": {},
        "previous_runs": _previous_runs(out_dir),
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
    if cfg.job.grid and status in ("complete", "incomplete"):
        finished = [state.out_dir / f"{t.stem}.png" for t in tasks if (state.out_dir / f"{t.stem}.png").exists()]
        if write_grid(finished, state.out_dir / GRID_FILE, cfg.job.grid_max_images):
            rec["grid"] = GRID_FILE
    rec["status"] = status
    rec["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    state.save()
