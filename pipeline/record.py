"""run.json: what it says and how it is written. The initial record (config, manifest, versions, earlier runs into
the folder), the running state rewritten atomically as images are made, and the final record (counts, `missing`,
`reason`, `resume`, grid.png), merged from every rank's part in a data-parallel run (pipeline/ranks.py).

Called by pipeline/runner.py, which owns the flow; this module never imports it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline import distributed
from pipeline.config.schema import RunConfig
from pipeline.interrupt import StopSignals
from pipeline.manifest import PROJECT_ROOT, Manifest
from pipeline.outputs.atomic import atomic_write_json
from pipeline.outputs.existing import Index, finished_images, partition
from pipeline.outputs.grid import write_grid
from pipeline.ranks import merge_parts, rank_file, wait_for_ranks
from pipeline.runinfo import Stopwatch, device_name, git_commit, package_versions, process_gone
from pipeline.tasks import ImageTask

log = logging.getLogger("pipeline")
RUN_FILE, GRID_FILE = "run.json", "grid.png"


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


def resume_command(overrides: list[str] | None, out_dir: Path) -> str:
    """The command that finishes this run: the same overrides, pinned to the same folder."""
    args = list(overrides or [])
    if not any(a.lstrip("+~").split("=", 1)[0] == "job.output_dir" for a in args):
        args.append(f"job.output_dir={Path(out_dir).resolve()}")
    entry = "svdq-batch" if Path(sys.argv[0]).name == "svdq-batch" else "python -m pipeline"
    return f"{entry} {shlex.join(args)}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
    if process_gone(pid, host):
        return f"process {pid} is gone"
    return f"process {pid} does not hold the folder lock (that pid is another process now)"


def without_layers(summary: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """A sidecar's quantization summary: the per-layer report (kilobytes) stays in run.json, once."""
    if summary is None:
        return None
    return {k: v for k, v in summary.items() if k != "layers"} | {"layers_in": RUN_FILE}


def input_files(manifest: Manifest) -> list[dict[str, Any]]:
    """The distinct input images (and masks) of the rows the run makes, once each, in manifest order."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for row in manifest.rows:
        for i in row.images + ((row.mask,) if row.mask is not None else ()):
            seen.setdefault((i.path, i.sha256), {"path": i.path, "sha256": i.sha256, "width": i.width,
                                                 "height": i.height})
    return list(seen.values())


def initial_record(cfg, manifest, plan, device, dtype, out_dir, overrides, previous: bool = True,
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
            **({"inputs": inputs} if (inputs := input_files(manifest)) else {}),
        },
        "model": {"name": cfg.model.name, "family": cfg.model.family, "source": cfg.model.source.value},
        "quantization": {"plan": plan.to_dict()},
        "versions": package_versions(),
        "git_commit": git_commit(PROJECT_ROOT),
        "device": device_name(device),
        "dtype": dtype_name(dtype),
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


def finish_record(cfg: RunConfig, tasks: list[ImageTask], state: RunState, clock: Stopwatch, status: str,
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
        parts = wait_for_ranks(state, stop if normal else None, grace_s=None if normal and stop else 10)
        status = merge_parts(state, parts, status)
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
        given = {state.out_dir / f"{t.stem}.png": [Path(i.path) for i in t.inputs] for t in tasks if t.inputs}
        if write_grid(finished_pngs, state.out_dir / GRID_FILE, cfg.job.grid_max_images, given):
            rec["grid"] = GRID_FILE
    rec["status"] = status
    rec["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if group.distributed:
        atomic_write_json(state.out_dir / RUN_FILE, rec)
    else:
        state.save()
