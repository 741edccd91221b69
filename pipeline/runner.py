"""Run one job: manifest -> image tasks -> (resume check) -> model -> batches -> files on disk.

Order matters for safety: everything that can be wrong with the config or the manifest is found
before the model is built; the output folder is locked for the run (outputs/lock.py), and finished
images made with other settings are refused before the model is built too (outputs/existing.py);
each image's PNG and sidecar are written atomically before its index line; run.json is rewritten at
the start and the end, so a killed run says `running` (the next run into the folder records it as
`killed`) and a rerun into the same folder makes exactly the missing images.

Batches and bytes: batches are formed over the job's WHOLE task list in manifest order (tasks.plan_batches), and
only those with a missing image are run: a partly finished batch is made whole again and only its missing images are
written (the finished ones are neither rewritten nor counted). So an image's bytes depend only on its row, the
settings and job.batch_size, not on what was on disk or how many processes shared the job (device, dtype, torch
version and CPU thread count still change them).

Data-parallel runs (torchrun, accelerate launch, srun: pipeline/distributed.py): batch i belongs to rank
i % world_size. Only rank 0 takes the folder lock, and it shares the outcome (and its drawn seeds and folder) with
the others; every rank then reads the folder and reaches the same decisions (resume, WouldOverwrite) before anyone
writes; rank 0 writes the initial run.json and rebuilds index.jsonl; a barrier; each rank makes its batches, writes
its images, appends their index lines and rewrites its part `ranks/rank-<r>.json` after each batch. Rank 0 shows
the progress of all ranks (it reads their parts), waits for every part to be final (or its process gone), then
merges them into run.json (each image counted once, `ranks` lists every rank, `missing` the images not on disk),
rebuilds index.jsonl from the sidecars and writes grid.png. A rank that dies leaves the run incomplete: the others
are stopped by the launcher (SIGTERM: interrupted, exit 143) and a rerun with any number of ranks makes exactly the
missing images.

Final statuses (run.json `status`): complete (every planned image is on disk), incomplete (some
batches failed with job.on_error=skip), empty (nothing planned), interrupted (SIGINT/SIGTERM: see
pipeline/interrupt.py; run_job raises RunInterrupted after writing run.json), failed (an exception,
re-raised). run_job never exits the process: the command line maps these to exit statuses.

This module keeps the flow; the parts live beside it: pipeline/generate.py (one pipeline call, the 16-bit
reference render and PSNR), pipeline/record.py (run.json: what it says and how it is written) and
pipeline/ranks.py (the ranks' parts of a data-parallel run: reading, waiting for, merging them).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline import distributed
from pipeline.config.schema import OnError, RunConfig
from pipeline.errors import ConfigError, ManifestError, PipelineError, RunInterrupted
from pipeline.generate import compare_to_reference, generate_batch, largest_call, psnr  # noqa: F401 (psnr: callers)
from pipeline.interrupt import Stop, StopSignals, signal_name
from pipeline.lora.run import RunLoras
from pipeline.manifest import Manifest, read_manifest, resolve_manifest_path
from pipeline.loading import check_reference_available, load_models
from pipeline.models import resolve_device, resolve_dtype
from pipeline.models.memory import Workload
from pipeline.models.prompt_limits import truncated_rows
from pipeline.outputs.atomic import remove_stale_temp_files
from pipeline.outputs.existing import Index, WouldOverwrite, finished_images, index_line, partition
from pipeline.outputs.images import write_image
from pipeline.outputs.lock import FolderLock
from pipeline.progress import progress, step_callback
from pipeline.quantization import QuantPlan, reconcile, resolve_plan
from pipeline.quantization.file_info import CheckpointInfo
from pipeline.ranks import RANKS_DIR, RanksProgress, clear_parts, wait_for_ranks
from pipeline.record import (RUN_FILE, RunState, config_dict, dtype_name, finish_record,  # noqa: F401 (callers)
                             initial_record, resume_command, skipped_row_count, without_layers)
from pipeline.runinfo import PeakMemory, Stopwatch
from pipeline.tasks import (Batch, ImageTask, draw_random_seeds, expand, plan_batches, recorded_random_seeds,
                            run_identity)

log = logging.getLogger("pipeline")


def load_manifest(cfg: RunConfig) -> Manifest:
    """Read and check the whole manifest (input images against the model's input kind too); with on_error=abort
    any bad row stops the run here."""
    from pipeline.families import inputs_of

    manifest = read_manifest(resolve_manifest_path(cfg.job.manifest), cfg.job.limit, cfg.job.columns,
                             inputs=inputs_of(cfg.model.family))
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


def _has_true_cfg(family_name: str) -> bool:
    """Whether the family's diffusers pipeline takes `true_cfg_scale` (a negative-prompt pass)."""
    import diffusers

    from pipeline.families import family
    from pipeline.quantization.diffusers_compat import takes_argument

    return takes_argument(getattr(diffusers, family(family_name).pipeline_class), "true_cfg_scale")


def _check_rows_against_model(manifest: Manifest, cfg: RunConfig) -> None:
    """Row values that are fine in general but not for this model become row problems too."""
    from pipeline.manifest import RowProblem

    least = cfg.model.recommended.min_steps
    bad = [r for r in manifest.rows if r.steps is not None and r.steps < least]
    for r in bad:
        manifest.problems.append(RowProblem(str(manifest.path), r.line, "steps",
                                            f"{cfg.model.name} needs at least {least} steps, got {r.steps}"))
    if not _has_true_cfg(cfg.model.family):  # e.g. FLUX.1 Fill: no negative-prompt pass at all
        default = cfg.sampler.true_cfg_scale if cfg.sampler.true_cfg_scale is not None else \
            cfg.model.recommended.true_cfg_scale
        if default > 1:
            raise ConfigError([("sampler.true_cfg_scale", f"{cfg.model.name} has no true classifier-free guidance "
                                f"(its pipeline takes no true_cfg_scale or negative prompt); set it to 1, got {default}")])
        no_cfg = [r for r in manifest.rows if r.true_cfg_scale is not None and r.true_cfg_scale > 1 and r not in bad]
        for r in no_cfg:
            manifest.problems.append(RowProblem(str(manifest.path), r.line, "true_cfg_scale",
                                                f"{cfg.model.name} has no true classifier-free guidance; "
                                                f"use 1 (or leave it out), got {r.true_cfg_scale}"))
        bad += no_cfg
    manifest.rows = [r for r in manifest.rows if r not in bad]
    manifest.bad_rows += len(bad)
    manifest.problems.sort(key=lambda p: p.line)


def run_job(cfg: RunConfig, out_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Generate every image of the job into `out_dir` (skipping finished ones); return run.json's dict.

    Raises PipelineError for what the user can fix (a bad manifest, OutputLocked, WouldOverwrite...), before
    any model is loaded; RunInterrupted after SIGINT/SIGTERM (run.json then says `interrupted`, unless the
    signal came before the run had the folder); any other exception after recording it as `failed`."""
    clock = Stopwatch()
    with StopSignals() as stop, distributed.Group(distributed.detect()) as group:
        lock = FolderLock(out_dir, cfg.job.wait_for_lock)
        try:
            try:
                with stop.immediate():  # nothing written yet: a signal stops the run at once
                    manifest = load_manifest(cfg)
                    plan, info = plan_quantization(cfg)
                    for note in plan.notes:
                        log.info("quantization: %s", note)
                    loras = RunLoras.prepare(cfg, manifest.rows, info)  # every LoRA file read and checked now
                    device = resolve_device(cfg.sampler.device)
                    if device.type == "cuda" and group.distributed:
                        device = group.cuda_device()  # cuda:LOCAL_RANK, also the current device
                    dtype = resolve_dtype(cfg.sampler.dtype, device)
                    start = _take_folder(cfg, manifest, out_dir, lock, group)
                    out_dir = Path(start["out_dir"])
            except (Stop, KeyboardInterrupt) as e:
                raise RunInterrupted(getattr(e, "signum", signal.SIGINT), out_dir) from None
            record = _run_locked(cfg, manifest, plan, info, device, dtype, out_dir, overrides, stop, clock,
                                 group, start, loras)
        finally:
            lock.release()
    if stop.unhandled is not None:  # it came while the run wrote its final record: still, stop a sweep here
        raise RunInterrupted(stop.unhandled, out_dir)
    return record


class RankRefused(PipelineError):
    """Rank 0 could not take the output folder (another run holds it...): every rank stops with its message."""


def _take_folder(cfg: RunConfig, manifest: Manifest, out_dir: Path, lock: FolderLock,
                 group: distributed.Group) -> dict[str, Any]:
    """Rank 0 (the only process of a one-process run) locks the folder, clears what a killed run left (temp files,
    ranks/ parts) and draws the seeds of -1s; the outcome goes to every rank: {"out_dir", "previous_seeds",
    "random_seeds", "previous_parts"}. Ranks > 0 raise rank 0's refusal."""
    if not group.is_main:
        got = group.share(None)
        if "error" in got:
            raise RankRefused(got["error"])
        Path(got["out_dir"]).mkdir(parents=True, exist_ok=True)
        return got
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        remove_stale_temp_files(out_dir)  # only now: another run's temp files were in use until we had the lock
        previous_parts = clear_parts(out_dir)
        if group.distributed:
            (out_dir / RANKS_DIR).mkdir(exist_ok=True)
        previous_seeds = recorded_random_seeds(out_dir / RUN_FILE)  # seeds an earlier run here drew for -1: reused
        random_seeds = draw_random_seeds(manifest.rows, cfg.sampler.seed, previous_seeds)
    except BaseException as e:
        group.share({"error": f"rank 0: {e}" if str(e) else f"rank 0 stopped: {type(e).__name__}"})
        raise
    return group.share({"out_dir": str(out_dir), "previous_seeds": previous_seeds, "random_seeds": random_seeds,
                        "previous_parts": previous_parts})


def _run_locked(cfg: RunConfig, manifest: Manifest, plan: QuantPlan, info: Optional[CheckpointInfo],
                device: torch.device, dtype: torch.dtype, out_dir: Path, overrides: list[str] | None,
                stop: StopSignals, clock: Stopwatch, group: Optional[distributed.Group] = None,
                start: Optional[dict[str, Any]] = None, loras: Optional[RunLoras] = None) -> dict[str, Any]:
    """The run, holding the folder lock (rank 0 does). Signals are acted on at safe points from here on."""
    loras = loras if loras is not None else RunLoras({}, [])
    group = group or distributed.Group(distributed.Launch())
    start = start or {}
    previous_seeds, random_seeds = start.get("previous_seeds", {}), start.get("random_seeds", {})
    tasks = list(expand(manifest.rows, cfg, run_identity(cfg, plan, str(dtype)), random_seeds=random_seeds))
    finished = finished_images(out_dir)  # every rank: nobody writes before the barrier below
    part = partition(tasks, finished)
    if part.conflicts and not cfg.job.overwrite:
        raise WouldOverwrite(out_dir, part.conflicts, {**_image_settings(cfg, plan), "dtype": dtype_name(dtype)})
    todo = plan_batches(tasks, cfg.job.batch_size, part.pending, group.rank, group.world_size)
    if group.is_main:
        index = Index.rebuild(out_dir, finished)
    else:
        index = Index(out_dir)
        index.lines = {name: index_line(side) for name, side in finished.items()}
    index.append_only = group.distributed
    state = RunState(out_dir, index, group=group, batches=[b.number for b in todo],
                     planned_here=sum(len(b.pending) for b in todo))
    state.record = initial_record(cfg, manifest, plan, device, dtype, out_dir, overrides,
                                  previous=group.is_main, previous_parts=start.get("previous_parts"))
    state.record["counts"].update(planned=len(tasks), skipped_existing=len(part.done))
    if group.distributed:
        state.record.update(world_size=group.world_size, launcher=group.launch.launcher)
    if random_seeds or previous_seeds:  # kept across reruns, also those of rows this run leaves out
        state.record["random_seeds"] = {**previous_seeds, **random_seeds}
    if random_seeds:
        log.info("random seeds (-1): %s", ", ".join(f"{k}={v}" for k, v in random_seeds.items()))
    if part.conflicts and group.is_main:
        log.warning("job.overwrite=true: replacing %d finished image(s) made with other settings in %s",
                    len(part.conflicts), out_dir)
    state.save()
    group.barrier()  # rank 0 has rebuilt index.jsonl and written run.json: the ranks may write now
    if part.done:
        log.info("resume: %d of %d images already in %s", len(part.done), len(tasks), out_dir)
    if group.distributed:
        log.info("rank %d of %d (%s): %d of %d batches with missing images are this rank's", group.rank,
                 group.world_size,
                 group.launch.launcher, len(todo), sum(1 for _ in plan_batches(tasks, cfg.job.batch_size,
                                                                                part.pending)))

    try:
        if not tasks:
            state.record["reason"] = (f"the manifest has 0 usable rows ({state.record['counts']['skipped_rows']} "
                                      "skipped)")
            log.warning("nothing to generate: %s", state.record["reason"])
            finish_record(cfg, tasks, state, clock, status="empty", overrides=overrides, stop=stop)
            return state.record
        if part.pending:
            _generate_all(cfg, plan, info, todo, len(part.pending), state, stop, device, loras,
                          largest_call([t for b in todo for t in b.tasks], cfg.job.batch_size, dtype.itemsize,
                                       cfg.model.family))
        stop.check()  # a signal during the last batch's saving: say so rather than `complete`
        finish_record(cfg, tasks, state, clock, status="incomplete" if state.record["counts"]["failed"] else "complete",
                      overrides=overrides, stop=stop)
    except (Stop, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", signal.SIGINT)  # KeyboardInterrupt: no handler of ours (not the main thread)
        state.record["signal"] = signal_name(signum)
        state.record["resume"] = resume_command(overrides, out_dir)
        finish_record(cfg, tasks, state, clock, status="interrupted", overrides=overrides)
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
        finish_record(cfg, tasks, state, clock, status="failed", overrides=overrides)
        raise
    return state.record


def _image_settings(cfg: RunConfig, plan: QuantPlan) -> dict[str, Any]:
    """The run-wide settings every image's sidecar and PNG metadata record (beside task.params())."""
    return {
        "model": cfg.model.name,
        "scheduler": cfg.sampler.scheduler.name.value,
        "quantization": {k: getattr(plan, k) for k in ("enabled", "precision", "rank", "act_unsigned", "decided_by")},
    }


def _generate_all(cfg: RunConfig, plan: QuantPlan, info: Optional[CheckpointInfo], todo: list[Batch],
                  pending_total: int, state: RunState, stop: StopSignals, device: torch.device, loras: RunLoras,
                  work: Workload) -> None:
    """Make this rank's batches (`todo`); `pending_total` is the images all ranks write (rank 0's progress)."""
    rec, group = state.record, state.group
    models = None
    if todo:
        load = Stopwatch()
        with stop.immediate():  # loading writes nothing: a signal need not wait for it to end
            models = load_models(cfg, plan, info, work, loras)
        device = models.device
        rec["quantization"]["summary"] = models.summary.to_dict()
        rec["placement"] = models.placement.to_dict()
        if models.kernel_check is not None:
            rec["quantization"]["kernel_check"] = models.kernel_check
        if loras.used:
            rec["loras"] = loras.to_dict()
        rec["timing"]["model_load_s"] = round(load.elapsed(), 4)
        truncated = truncated_rows(models.pipe, cfg.model.family, [t for b in todo for t in b.pending])
        if truncated:
            rec["prompt_truncated"] = truncated
    state.save()
    memory = PeakMemory(device)
    mode = cfg.job.progress if group.is_main else "none"  # ranks > 0: nothing per image
    with memory, progress(pending_total, mode) as bar:
        shown = RanksProgress(bar, state)
        for batch in todo:
            stop.check()
            clock = Stopwatch()
            pending = batch.pending
            try:
                steps = step_callback(bar, batch.tasks[0].steps, label=pending[0].stem)
                loras.use(batch.tasks[0].loras, models.pipe.transformer, models.reference)  # the batch's set
                images = generate_batch(models.pipe, cfg.model.family, list(batch.tasks),
                                        on_step=[steps, stop.step_end])
            except Exception as e:
                if cfg.job.on_error == OnError.abort:
                    raise
                reason = f"{type(e).__name__}: {e}"
                log.error("batch of %d failed: %s", len(batch.tasks), reason)
                rec["failed"] += [{"file": f"{t.stem}.png", "line": t.row.line, "reason": reason} for t in pending]
                rec["counts"]["failed"] += len(pending)
                state.save()
                shown.update("failed")
                continue
            per_image = clock.elapsed() / len(batch.tasks)
            psnrs = (compare_to_reference(models, cfg.model.family, list(batch.tasks), images, rec, stop)
                     if models.reference is not None else [None] * len(batch.tasks))
            for task, write, image, psnr_db in zip(batch.tasks, batch.todo, images, psnrs):
                if write:  # the batch's finished images stay as they are (same bytes: same batch)
                    _save(cfg, plan, task, image, per_image, len(batch.tasks), state, device, psnr_db)
            state.save()
            shown.update(pending[-1].stem)
        if group.distributed and group.is_main:
            wait_for_ranks(state, stop, shown)
    rec["memory"] = memory.to_dict()
    values = [i["psnr_vs_unquantized"] for i in rec["images"] if i.get("psnr_vs_unquantized") is not None]
    if values:
        rec["quality"] = {"psnr_vs_unquantized_mean": round(sum(values) / len(values), 3),
                          "psnr_vs_unquantized_min": round(min(values), 3), "images": len(values)}


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
        "quantization": {**plan.to_dict(), "summary": without_layers(rec["quantization"].get("summary"))},
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
