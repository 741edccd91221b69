"""After a Hydra multirun: one table of every job (overrides, images, time, peak memory).

Registered as a Hydra callback in conf/config.yaml; writes sweep.json and sweep.md into the
sweep folder and prints the table with rich. It also notes which jobs did not complete, for the
command's exit status (pipeline/cli.py `run_entry` reads it with `take_outcome` once Hydra returns).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline.outcome import exit_status
from pipeline.outputs.atomic import atomic_write_bytes, atomic_write_json

COLUMNS = ("job", "overrides", "status", "made", "existing", "failed", "time_s", "peak_mem_mib")


_outcome: dict[str, Any] | None = None


def take_outcome() -> dict[str, Any] | None:
    """The last sweep's outcome ({sweep_dir, jobs, not_complete: [(job, why)]}), once; None if none ran."""
    global _outcome
    taken, _outcome = _outcome, None
    return taken


def records(sweep_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every job folder of a sweep that has a run.json, in job order, with the record."""
    found = []
    for job_dir in sorted((d for d in sweep_dir.iterdir() if d.is_dir()), key=_job_number):
        run = job_dir / "run.json"
        if run.exists():
            found.append((job_dir, json.loads(run.read_text())))
    return found


def outcome(sweep_dir: Path) -> dict[str, Any]:
    """Which jobs did not complete (by the same rule as a single run's exit status), and why."""
    found = records(sweep_dir)
    bad = []
    for job_dir, rec in found:
        allow_empty = bool(((rec.get("config") or {}).get("job") or {}).get("allow_empty", False))
        code, why = exit_status(rec, allow_empty)
        if code:
            bad.append((job_dir.name, why))
    return {"sweep_dir": str(sweep_dir), "jobs": len(found), "not_complete": bad}


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for job_dir, rec in records(sweep_dir):
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


def _job_number(d: Path) -> tuple[int, str]:
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


def summarize(sweep_dir: Path, print_table: bool = True) -> list[dict[str, Any]]:
    rows = collect(sweep_dir)
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
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _outcome
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            summarize(sweep_dir)
            _outcome = outcome(sweep_dir)
