"""The parts of a data-parallel run: each rank rewrites its part, ranks/rank-<r>.json; rank 0 reads them to show
every rank's progress, waits for them to be final (or their process gone) and merges them into run.json's record.

How the ranks share the work: pipeline/runner.py; the record the parts merge into: pipeline/record.py (which
imports this module; RunState is imported here for type hints only, so there is no import cycle).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pipeline.interrupt import StopSignals
from pipeline.runinfo import process_gone

if TYPE_CHECKING:
    from pipeline.record import RunState

RANKS_DIR = "ranks"  # ranks/rank-<r>.json: each rank's part of a data-parallel run
FINAL = ("complete", "incomplete", "empty", "interrupted", "failed", "gone")


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
    if process_gone(part.get("pid"), part.get("host")):
        part["status"] = "gone"
        return True
    return False


def clear_parts(out_dir: Path) -> list[dict[str, Any]]:
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


class RanksProgress:
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


def wait_for_ranks(state: RunState, stop: Optional[StopSignals], shown: Optional[RanksProgress] = None,
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


def merge_parts(state: RunState, parts: dict[int, dict[str, Any]], status: str) -> str:
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
