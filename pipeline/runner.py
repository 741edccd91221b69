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

from pipeline import distributed
from pipeline.config.schema import OnError, RunConfig
from pipeline.errors import ManifestError, PipelineError, RunInterrupted
from pipeline.interrupt import Stop, StopSignals, signal_name
from pipeline.manifest import PROJECT_ROOT, Manifest, read_manifest, resolve_manifest_path
from pipeline.loading import check_reference_available, load_models
from pipeline.models import resolve_device, resolve_dtype
from pipeline.models.memory import Workload
from pipeline.models.prompt_limits import truncated_rows
from pipeline.outputs.atomic import atomic_write_json, remove_stale_temp_files
from pipeline.outputs.existing import Index, WouldOverwrite, finished_images, index_line, partition
from pipeline.outputs.grid import write_grid
from pipeline.outputs.images import write_image
from pipeline.outputs.lock import FolderLock
from pipeline.progress import progress, step_callback
from pipeline.quantization import QuantPlan, reconcile, resolve_plan
from pipeline.quantization.file_info import CheckpointInfo
from pipeline.runinfo import PeakMemory, Stopwatch, device_name, git_commit, package_versions
from pipeline.tasks import (Batch, ImageTask, draw_random_seeds, expand, plan_batches, recorded_random_seeds,
                            run_identity)

log = logging.getLogger("pipeline")
RUN_FILE, GRID_FILE = "run.json", "grid.png"
RANKS_DIR = "ranks"  # ranks/rank-<r>.json: each rank's part of a data-parallel run
FINAL = ("complete", "incomplete", "empty", "interrupted", "failed", "gone")


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
    """What run.json says; rewritten atomically whenever it changes in a way worth keeping. In a data-parallel run
    every rank also rewrites its part, ranks/rank-<r>.json, and only rank 0 writes run.json."""

    out_dir: Path
    index: Index
    record: dict[str, Any] = field(default_factory=dict)
    group: distributed.Group = field(default_factory=lambda: distributed.Group(distributed.Launch()))
    batches: list[int] = field(default_factory=list)  # numbers of the batches this rank makes
    planned_here: int = 0  # images this rank is to write

    def save(self) -> None:
        if self.group.distributed:
            atomic_write_json(rank_file(self.out_dir, self.group.rank), self.part())
        if self.group.is_main:
            atomic_write_json(self.out_dir / RUN_FILE, self.record)

    def part(self) -> dict[str, Any]:
        """This rank's part of the run (ranks/rank-<r>.json)."""
        rec = self.record
        c = rec["counts"]
        return {
            "rank": self.group.rank, "world_size": self.group.world_size, "local_rank": self.group.local_rank,
            "pid": os.getpid(), "host": socket.gethostname(), "device": rec["device"],
            "status": rec.get("rank_status", "running"), "started_at": rec["started_at"],
            "finished_at": rec.get("rank_finished_at"), "batches": self.batches, "planned": self.planned_here,
            "made": c["made"], "failed": c["failed"], "replaced": c.get("replaced", 0),
            "images": rec["images"], "failed_images": rec["failed"], "timing": rec["timing"],
            "memory": rec["memory"],
            **{k: rec[k] for k in ("signal", "error") if k in rec},
        }


def rank_file(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / RANKS_DIR / f"rank-{rank}.json"


def read_parts(out_dir: Path, world_size: int) -> dict[int, dict[str, Any]]:
    """{rank: its part} of the parts on disk (a missing or unreadable one is left out)."""
    parts = {}
    for r in range(world_size):
        try:
            data = json.loads(rank_file(out_dir, r).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            parts[r] = data
    return parts


def _part_final(part: Optional[dict[str, Any]]) -> bool:
    """The rank has finished (its status says so), or its process is gone (same host, pid dead)."""
    if part is None:
        return False
    if part.get("status") in FINAL:
        return True
    pid, host = part.get("pid"), part.get("host")
    if host == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            part["status"] = "gone"
            return True
        except PermissionError:
            pass
    return False


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
                    device = resolve_device(cfg.sampler.device)
                    if device.type == "cuda" and group.distributed:
                        device = group.cuda_device()  # cuda:LOCAL_RANK, also the current device
                    dtype = resolve_dtype(cfg.sampler.dtype, device)
                    start = _take_folder(cfg, manifest, out_dir, lock, group)
                    out_dir = Path(start["out_dir"])
            except (Stop, KeyboardInterrupt) as e:
                raise RunInterrupted(getattr(e, "signum", signal.SIGINT), out_dir) from None
            record = _run_locked(cfg, manifest, plan, info, device, dtype, out_dir, overrides, stop, clock,
                                 group, start)
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
        previous_parts = _clear_parts(out_dir)
        if group.distributed:
            (out_dir / RANKS_DIR).mkdir(exist_ok=True)
        previous_seeds = recorded_random_seeds(out_dir / RUN_FILE)  # seeds an earlier run here drew for -1: reused
        random_seeds = draw_random_seeds(manifest.rows, cfg.sampler.seed, previous_seeds)
    except BaseException as e:
        group.share({"error": f"rank 0: {e}" if str(e) else f"rank 0 stopped: {type(e).__name__}"})
        raise
    return group.share({"out_dir": str(out_dir), "previous_seeds": previous_seeds, "random_seeds": random_seeds,
                        "previous_parts": previous_parts})


def _clear_parts(out_dir: Path) -> list[dict[str, Any]]:
    """Remove the ranks/ parts an earlier run left; return their summaries (for previous_runs)."""
    folder = out_dir / RANKS_DIR
    if not folder.is_dir():
        return []
    summaries = []
    for f in sorted(folder.iterdir()):
        if f.name.startswith("rank-") and f.suffix == ".json":
            try:
                d = json.loads(f.read_text())
                summaries.append({k: d.get(k) for k in ("rank", "status", "made", "failed", "pid", "host")})
            except (OSError, ValueError, AttributeError):
                pass
        if f.is_file():
            f.unlink(missing_ok=True)
    return sorted(summaries, key=lambda d: d.get("rank") if isinstance(d.get("rank"), int) else -1)


def _run_locked(cfg: RunConfig, manifest: Manifest, plan: QuantPlan, info: Optional[CheckpointInfo],
                device: torch.device, dtype: torch.dtype, out_dir: Path, overrides: list[str] | None,
                stop: StopSignals, clock: Stopwatch, group: Optional[distributed.Group] = None,
                start: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The run, holding the folder lock (rank 0 does). Signals are acted on at safe points from here on."""
    group = group or distributed.Group(distributed.Launch())
    start = start or {}
    previous_seeds, random_seeds = start.get("previous_seeds", {}), start.get("random_seeds", {})
    tasks = list(expand(manifest.rows, cfg, run_identity(cfg, plan, str(dtype)), random_seeds=random_seeds))
    finished = finished_images(out_dir)  # every rank: nobody writes before the barrier below
    part = partition(tasks, finished)
    if part.conflicts and not cfg.job.overwrite:
        raise WouldOverwrite(out_dir, part.conflicts, {**_image_settings(cfg, plan), "dtype": _dtype_name(dtype)})
    todo = plan_batches(tasks, cfg.job.batch_size, part.pending, group.rank, group.world_size)
    if group.is_main:
        index = Index.rebuild(out_dir, finished)
    else:
        index = Index(out_dir)
        index.lines = {name: index_line(side) for name, side in finished.items()}
    index.append_only = group.distributed
    state = RunState(out_dir, index, group=group, batches=[b.number for b in todo],
                     planned_here=sum(len(b.pending) for b in todo))
    state.record = _initial_record(cfg, manifest, plan, device, dtype, out_dir, overrides,
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
            _finish(cfg, tasks, state, clock, status="empty", overrides=overrides, stop=stop)
            return state.record
        if part.pending:
            _generate_all(cfg, plan, info, todo, len(part.pending), state, stop, device,
                          largest_call([t for b in todo for t in b.tasks], cfg.job.batch_size, dtype.itemsize))
        stop.check()  # a signal during the last batch's saving: say so rather than `complete`
        _finish(cfg, tasks, state, clock, status="incomplete" if state.record["counts"]["failed"] else "complete",
                overrides=overrides, stop=stop)
    except (Stop, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", signal.SIGINT)  # KeyboardInterrupt: no handler of ours (not the main thread)
        state.record["signal"] = signal_name(signum)
        state.record["resume"] = resume_command(overrides, out_dir)
        _finish(cfg, tasks, state, clock, status="interrupted", overrides=overrides)
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
        _finish(cfg, tasks, state, clock, status="failed", overrides=overrides)
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


def _generate_all(cfg: RunConfig, plan: QuantPlan, info: Optional[CheckpointInfo], todo: list[Batch],
                  pending_total: int, state: RunState, stop: StopSignals, device: torch.device,
                  work: Workload) -> None:
    """Make this rank's batches (`todo`); `pending_total` is the images all ranks write (rank 0's progress)."""
    rec, group = state.record, state.group
    models = None
    if todo:
        load = Stopwatch()
        with stop.immediate():  # loading writes nothing: a signal need not wait for it to end
            models = load_models(cfg, plan, info, work)
        device = models.device
        rec["quantization"]["summary"] = models.summary.to_dict()
        rec["placement"] = models.placement.to_dict()
        if models.kernel_check is not None:
            rec["quantization"]["kernel_check"] = models.kernel_check
        rec["timing"]["model_load_s"] = round(load.elapsed(), 4)
        truncated = truncated_rows(models.pipe, cfg.model.family, [t for b in todo for t in b.pending])
        if truncated:
            rec["prompt_truncated"] = truncated
    state.save()
    memory = PeakMemory(device)
    mode = cfg.job.progress if group.is_main else "none"  # ranks > 0: nothing per image
    with memory, progress(pending_total, mode) as bar:
        shown = _Shown(bar, state)
        for batch in todo:
            stop.check()
            clock = Stopwatch()
            pending = batch.pending
            try:
                steps = step_callback(bar, batch.tasks[0].steps, label=pending[0].stem)
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
            psnrs = (_compare(models, cfg.model.family, list(batch.tasks), images, rec, stop)
                     if models.reference is not None else [None] * len(batch.tasks))
            for task, write, image, psnr_db in zip(batch.tasks, batch.todo, images, psnrs):
                if write:  # the batch's finished images stay as they are (same bytes: same batch)
                    _save(cfg, plan, task, image, per_image, len(batch.tasks), state, device, psnr_db)
            state.save()
            shown.update(pending[-1].stem)
        if group.distributed and group.is_main:
            _wait_for_ranks(state, stop, shown)
    rec["memory"] = memory.to_dict()
    values = [i["psnr_vs_unquantized"] for i in rec["images"] if i.get("psnr_vs_unquantized") is not None]
    if values:
        rec["quality"] = {"psnr_vs_unquantized_mean": round(sum(values) / len(values), 3),
                          "psnr_vs_unquantized_min": round(min(values), 3), "images": len(values)}


class _Shown:
    """Rank 0's bar counts the images of every rank: its own, plus those the other ranks' parts report."""

    def __init__(self, bar, state: RunState):
        self.bar, self.state, self.shown = bar, state, 0

    def update(self, label: str, parts: Optional[dict[int, dict[str, Any]]] = None) -> None:
        c = self.state.record["counts"]
        done = c["made"] + c["failed"]
        group = self.state.group
        if group.distributed:
            if parts is None:
                parts = read_parts(self.state.out_dir, group.world_size)
            done += sum((p.get("made") or 0) + (p.get("failed") or 0) for r, p in parts.items() if r != group.rank)
        if done > self.shown:
            self.bar.advance(done - self.shown, label)
            self.shown = done


def _wait_for_ranks(state: RunState, stop: Optional[StopSignals], shown: Optional[_Shown] = None,
                    grace_s: Optional[float] = None, poll_s: float = 0.2) -> dict[int, dict[str, Any]]:
    """Rank 0: wait until every other rank's part is final (or its process gone), showing their progress; a
    signal stops the wait (Stop), unless `grace_s` is given (then it gives up after that long)."""
    group = state.group
    deadline = None if grace_s is None else time.monotonic() + grace_s
    while True:
        parts = read_parts(state.out_dir, group.world_size)
        if shown is not None:
            shown.update("other ranks", parts)
        if all(_part_final(parts.get(r)) for r in range(group.world_size) if r != group.rank):
            return parts
        if deadline is not None:
            if time.monotonic() >= deadline:
                return parts
        elif stop is not None:
            stop.check()
        time.sleep(poll_s)


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


def _previous_runs(out_dir: Path, parts: Optional[list] = None) -> list[dict[str, Any]]:
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
    if parts and (old.get("world_size") or 1) > 1:  # its ranks' parts: what each had made when it stopped
        last["ranks"] = parts
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


def _initial_record(cfg, manifest, plan, device, dtype, out_dir, overrides, previous: bool = True,
                    previous_parts: Optional[list] = None) -> dict[str, Any]:
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
        "previous_runs": _previous_runs(out_dir, previous_parts) if previous else [],
    }


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The fully resolved config as plain JSON-able data."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def _finish(cfg: RunConfig, tasks: list[ImageTask], state: RunState, clock: Stopwatch, status: str,
            overrides: list[str] | None = None, stop: Optional[StopSignals] = None) -> None:
    """The final record: this rank's part; on rank 0 (after the other ranks' parts are final) run.json with the
    merged counts, `ranks`, `missing` (planned images not on disk), index.jsonl rebuilt, and grid.png."""
    rec, group = state.record, state.group
    times = [i["time_s"] for i in rec["images"]]
    rec["timing"].update(
        total_s=round(clock.elapsed(), 4),
        generate_s=round(sum(times), 4),
        per_image_mean_s=round(sum(times) / len(times), 4) if times else None,
    )
    if group.distributed:
        rec["rank_status"] = status
        rec["rank_finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(rank_file(state.out_dir, group.rank), state.part())  # before waiting: others read it
        if not group.is_main:
            rec["status"], rec["finished_at"] = status, rec["rank_finished_at"]
            return
        # a normal end waits for the others (a signal stops the wait); stopping or failing: they are stopping too,
        # or will never end (the launcher ends them): give them a moment to write their parts
        normal = status in ("complete", "incomplete", "empty")
        parts = _wait_for_ranks(state, stop if normal else None, grace_s=None if normal and stop else 10)
        status = _merge_parts(state, parts, status)
    missing: list[str] = []
    if status != "empty" and (group.distributed or status != "complete"):
        finished = finished_images(state.out_dir)
        missing = [f"{t.stem}.png" for t in partition(tasks, finished).pending]
        if group.distributed:
            state.index = Index.rebuild(state.out_dir, finished)  # one line per image: the ranks' appends merged
    if missing:
        rec["missing"] = missing
    counts = rec["counts"]
    if status == "complete" and missing:  # a rank ended without its images (killed, or failed outright)
        status = "incomplete"
    if status == "incomplete":
        gone = [r["rank"] for r in rec.get("ranks", []) if r.get("status") not in ("complete", "incomplete", "empty")]
        if counts["failed"] and not gone:
            rec["reason"] = (f"{counts['failed']} of {counts['planned']} images failed (job.on_error=skip); "
                             "rerun the same command to retry them")
        else:
            why = [f"{counts['failed']} image(s) failed (job.on_error=skip)"] if counts["failed"] else []
            if gone:
                why.append(f"rank(s) {', '.join(map(str, gone))} did not finish")
            rec["reason"] = (f"{'; '.join(why) or 'images are missing'}: {len(missing)} of {counts['planned']} "
                             "images missing; rerun the same command (any number of ranks) to make them")
        rec["resume"] = resume_command(overrides, state.out_dir)
    if cfg.job.grid and status in ("complete", "incomplete"):
        finished_pngs = [state.out_dir / f"{t.stem}.png" for t in tasks
                         if (state.out_dir / f"{t.stem}.png").exists()]
        if write_grid(finished_pngs, state.out_dir / GRID_FILE, cfg.job.grid_max_images):
            rec["grid"] = GRID_FILE
    rec["status"] = status
    rec["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if group.distributed:
        atomic_write_json(state.out_dir / RUN_FILE, rec)
    else:
        state.save()


def _merge_parts(state: RunState, parts: dict[int, dict[str, Any]], status: str) -> str:
    """Rank 0's record + the other ranks' parts -> the run's counts, images, failures, `ranks`; the run's status
    (rank 0's, unless another rank failed or stopped: then that)."""
    rec, group = state.record, state.group
    parts = {**parts, group.rank: state.part()}
    ranks, counts = [], rec["counts"]
    images, failed = list(rec["images"]), list(rec["failed"])
    for r in range(group.world_size):
        p = parts.get(r)
        if p is None:
            ranks.append({"rank": r, "status": "unknown (it wrote no part)"})
            continue
        ranks.append({k: p.get(k) for k in ("rank", "local_rank", "host", "pid", "device", "status", "started_at",
                                            "finished_at", "batches", "planned", "made", "failed", "timing",
                                            "memory", "signal", "error") if p.get(k) is not None})
        if r == group.rank:
            continue
        images += p.get("images") or []
        failed += p.get("failed_images") or []
        counts["made"] += p.get("made") or 0
        counts["failed"] += p.get("failed") or 0
        if p.get("replaced"):
            counts["replaced"] = counts.get("replaced", 0) + p["replaced"]
    rec.update(images=images, failed=failed, ranks=ranks)
    statuses = {r.get("status") for r in ranks}
    if status in ("complete", "incomplete"):
        for worse in ("failed", "interrupted"):
            if worse in statuses:
                bad = [r for r in ranks if r.get("status") == worse]
                rec.setdefault("error" if worse == "failed" else "signal",
                               bad[0].get("error" if worse == "failed" else "signal"))
                return worse
        if statuses - {"complete", "empty"}:
            return "incomplete"
        if counts["failed"]:
            return "incomplete"
    return status
