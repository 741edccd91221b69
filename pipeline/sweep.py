"""After a Hydra multirun: one table of every job (overrides, images, time, peak memory).

Whichever launcher ran the jobs (Hydra's basic one, submitit on Slurm or locally, joblib): the summary is
written once, in the launching process, when the sweep ends, or when Hydra gives up on it (cli.run_entry
calls `summarize_aborted`), and it lists every job the sweep planned, a killed or never-started one as failed.

Registered as a Hydra callback in conf/config.yaml; writes sweep.json and sweep.md into the
sweep folder and prints the table with rich. It also notes which jobs did not complete, for the
command's exit status (pipeline/cli.py `run_entry` reads it with `take_outcome` once Hydra returns).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.outcome import exit_status
from pipeline.outputs.atomic import atomic_write_bytes, atomic_write_json, read_json_object

log = logging.getLogger("pipeline")
COLUMNS = ("job", "overrides", "status", "made", "existing", "failed", "time_s", "peak_mem_mib")


_outcome: dict[str, Any] | None = None
_started: tuple[Path, list[list[str]] | None] | None = None  # a sweep begun here and not yet summarized


def take_outcome() -> dict[str, Any] | None:
    """The last sweep's outcome ({sweep_dir, jobs, not_complete: [(job, why)], unexpected}), once; None if none ran."""
    global _outcome, _started
    taken, _outcome, _started = _outcome, None, None
    return taken


def records(sweep_dir: Path, planned: list[list[str]] | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Every job of a sweep, in job order, with its record (run.json).

    Whichever launcher ran the jobs (Hydra's own, submitit on Slurm or locally, joblib), a job can end
    without a run.json: killed by the scheduler (time limit, memory) or dead before it wrote one. Such a
    job folder, and with `planned` (each job's overrides, from `planned_jobs`) a job that never got a
    folder at all, is listed as failed, with the last line of its scheduler log when there is one.
    """
    found = []
    seen = set()
    for job_dir in sorted((d for d in sweep_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
                          key=job_number):
        run = job_dir / "run.json"
        rec = read_json_object(run) if run.exists() else None
        if rec is None:
            rec = {"status": "failed", "overrides": _job_overrides(job_dir),
                   "error": _log_error(sweep_dir, job_dir)
                   or "the job left no run.json: it died before recording anything (see its pipeline.log)"}
        elif rec.get("status") == "running":  # the sweep is over: this job was killed mid-run
            why = _log_error(sweep_dir, job_dir)
            rec = {**rec, "error": rec.get("error") or why or "the job stopped mid-run (killed?)"}
        found.append((job_dir, rec))
        seen.add(job_number(job_dir)[0])
    for num, overrides in enumerate(planned or []):
        if num not in seen:
            where = _log_error(sweep_dir, None, num)
            found.append((sweep_dir / f"{num}_(not started)", {
                "status": "failed", "overrides": overrides,
                "error": where or "the job never started (no job folder); see the launcher's log"}))
    found.sort(key=lambda item: job_number(item[0]))
    return found


def _job_overrides(job_dir: Path) -> list[str]:
    """A job's overrides as Hydra saved them (.hydra/overrides.yaml), or [] if it did not get that far."""
    import yaml

    try:
        found = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in found] if isinstance(found, list) else []


def _log_error(sweep_dir: Path, job_dir: Path | None, num: int | None = None) -> str | None:
    """The last line of a submitit job's stderr log (`.submitit/<id>/<id>_<task>_log.err`), if any.

    The job's submitit id is in its .hydra/hydra.yaml (hydra.job.id); a Slurm array task that never
    got a job folder is found by its index (`<array id>_<num>`).
    """
    root = sweep_dir / ".submitit"
    if not root.is_dir():
        return None
    folders: list[Path] = []
    if job_dir is not None:
        job_id = _hydra_job_id(job_dir)
        if job_id:
            folders = [root / job_id]
    elif num is not None:
        folders = sorted(root.glob(f"*_{num}"))
    for folder in folders:
        for log in sorted(folder.glob("*_log.err")):
            try:
                lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            except OSError:
                continue
            if lines:
                return f"{lines[-1]} ({log})"
    return None


def _hydra_job_id(job_dir: Path) -> str | None:
    import yaml

    try:
        hydra = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
        job_id = hydra["job"].get("id")
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return None
    return str(job_id) if job_id not in (None, "", "???") and "/" not in str(job_id) else None


def planned_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides, as Hydra's basic sweeper will make them (None for another sweeper)."""
    try:
        sweeper = str(config.hydra.sweeper.get("_target_", ""))
        if not sweeper.endswith("BasicSweeper"):
            return None
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = config.hydra.sweeper.get("params") or {}
        lines = [f"{k}={v}" for k, v in params.items()] + [str(o) for o in config.hydra.overrides.task]
        parsed = OverridesParser.create().parse_overrides(lines)
        return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # the summary must not fail on this: without it, jobs with no folder go unlisted
        return None


def outcome(sweep_dir: Path, planned: list[list[str]] | None = None) -> dict[str, Any]:
    """Which jobs did not complete (by the same rule as a single run's exit status), and why."""
    found = records(sweep_dir, planned)
    bad = []
    for job_dir, rec in found:
        allow_empty = bool(((rec.get("config") or {}).get("job") or {}).get("allow_empty", False))
        code, why = exit_status(rec, allow_empty)
        if code:
            bad.append((job_dir.name, why))
    return {"sweep_dir": str(sweep_dir), "jobs": len(found), "not_complete": bad,
            "unexpected": any(rec.get("unexpected") for _, rec in found)}


def collect(sweep_dir: Path, planned: list[list[str]] | None = None) -> list[dict[str, Any]]:
    rows = []
    for job_dir, rec in records(sweep_dir, planned):
        counts = rec.get("counts", {})
        mem = rec.get("memory", {})
        peak = mem.get("peak_cuda_allocated_bytes") or mem.get("peak_rss_bytes")
        rows.append({
            "job": job_dir.name,
            "overrides": " ".join(rec.get("overrides", [])),
            "status": rec.get("status"),
            "made": counts.get("made", 0),
            "existing": counts.get("skipped_existing", 0),
            "failed": counts.get("failed", 0),
            "time_s": rec.get("timing", {}).get("total_s"),
            "peak_mem_mib": round(peak / 2**20, 1) if peak else None,
            "error": rec.get("error"),
            "dir": str(job_dir),
        })
    return rows


def job_number(d: Path) -> tuple[int, str]:
    """Sort key of a sweep's job folders (`<n>_<overrides>`): by job number, then name."""
    head = d.name.split("_", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, d.name)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join("" if r[c] is None else str(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def varying_overrides(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Split override keys into those that differ between jobs and those all jobs share."""
    parsed = [dict(o.split("=", 1) for o in r["overrides"].split() if "=" in o) for r in rows]
    keys = list(dict.fromkeys(k for p in parsed for k in p))
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    shared = [f"{k}={parsed[0][k]}" for k in keys if k not in varying and k in parsed[0]]
    return varying, shared


def summarize(sweep_dir: Path, print_table: bool = True,
              planned: list[list[str]] | None = None) -> list[dict[str, Any]]:
    rows = collect(sweep_dir, planned)
    atomic_write_json(sweep_dir / "sweep.json", {"sweep_dir": str(sweep_dir), "jobs": rows})
    atomic_write_bytes(sweep_dir / "sweep.md", to_markdown(rows).encode())
    if print_table:
        from rich.console import Console
        from rich.table import Table

        varying, shared = varying_overrides(rows)
        table = Table(title=f"sweep: {sweep_dir}", caption=("all jobs: " + " ".join(shared)) if shared else None)
        table.add_column("#", justify="right")
        for key in varying:
            table.add_column(key, overflow="fold")
        for c in COLUMNS[2:]:
            table.add_column(c, justify="left" if c == "status" else "right")
        for r in rows:
            ov = dict(o.split("=", 1) for o in r["overrides"].split() if "=" in o)
            num = r["job"].split("_", 1)[0]
            cells = [num, *(ov.get(k, "") for k in varying), *("" if r[c] is None else str(r[c]) for c in COLUMNS[2:])]
            table.add_row(*cells)
        Console().print(table)
    return rows


class SweepSummary(Callback):
    """on_multirun_start/end run in the launching process, on_job_end in each job's process (whichever launcher)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _started
        _started = (Path(config.hydra.sweep.dir), planned_jobs(config))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """A sweep job that raised something unexpected (a bug) still leaves a failed run.json to list."""
        if job_return.status != JobStatus.FAILED or config.hydra.mode != RunMode.MULTIRUN:
            return
        try:
            record_failure(Path(config.hydra.runtime.output_dir), job_return._return_value,  # .return_value re-raises
                           [str(o) for o in config.hydra.overrides.task])
        except Exception as e:  # never hide the job's own error behind this one
            log.warning("could not record the failed job: %s", e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _outcome, _started
        planned = _started[1] if _started else None
        _started = None
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            summarize(sweep_dir, planned=planned)
            _outcome = outcome(sweep_dir, planned)
            write_report(config, sweep_dir)


def write_report(config: DictConfig, sweep_dir: Path) -> None:
    """With report.enabled: the quality report (pipeline/report) of the finished sweep; never fails the sweep."""
    from omegaconf import OmegaConf

    report = config.get("report")
    if report is None or not report.get("enabled", False):
        return
    try:
        from pipeline.report import build_report

        index = build_report(sweep_dir, OmegaConf.to_object(report))
        log.info("quality report: %s", index)
    except Exception as e:  # the images and the summary are there; say why the report is not
        log.warning("could not write the quality report: %s (rerun: python -m pipeline.report %s)", e, sweep_dir)


def record_failure(out_dir: Path, error: BaseException, overrides: list[str]) -> None:
    from pipeline.record import RUN_FILE

    out_dir.mkdir(parents=True, exist_ok=True)
    rec = read_json_object(out_dir / RUN_FILE) if (out_dir / RUN_FILE).exists() else None
    if rec is not None and rec.get("status") not in ("running", None):
        return
    first = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {first[0]}" if first else type(error).__name__
    rec = {**(rec or {"overrides": overrides}), "status": "failed", "error": message, "unexpected": True}
    atomic_write_json(out_dir / RUN_FILE, rec)


def summarize_aborted() -> bool:
    """After Hydra gave up on a sweep (a job raised, or the launcher lost one: a scheduler kill), before
    on_multirun_end: write the summary of every job anyway and note the outcome. False if no sweep was open."""
    global _outcome, _started
    if _started is None:
        return False
    sweep_dir, planned = _started
    _started = None
    if not sweep_dir.is_dir():
        return False
    try:
        summarize(sweep_dir, planned=planned)
        _outcome = outcome(sweep_dir, planned)
    except Exception as e:
        log.warning("could not write the sweep summary: %s", e)
        return False
    return True
