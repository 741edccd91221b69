"""A finished run's record -> the command's exit status, one rule for single runs and every job of a sweep.

0 all planned images on disk (or nothing planned, with job.allow_empty); 3 incomplete; 2 (user errors) and
128 + signal (interrupts) are decided where those are caught, in pipeline/cli.py.
"""

from __future__ import annotations

EXIT_OK, EXIT_BUG, EXIT_USER_ERROR, EXIT_INCOMPLETE = 0, 1, 2, 3  # 130/143: interrupted (128 + signal)


def exit_status(record: dict, allow_empty: bool = False) -> tuple[int, str | None]:
    """A finished run's record (run.json) -> (exit status, why it is not 0, or None).

    Reads the counts as well as the status name, so a run that planned nothing counts as empty and
    one with failed images as incomplete whatever the runner called them.
    """
    status = record.get("status")
    counts = record.get("counts") or {}
    planned, failed = counts.get("planned", 0) or 0, counts.get("failed", 0) or 0
    where = record.get("output_dir")
    if status in ("failed", "interrupted", "running"):
        error = str(record.get("error") or "").strip().splitlines()
        return EXIT_INCOMPLETE, f"{status}" + (f": {error[0]}" if error else "")
    if failed or status == "incomplete":
        return EXIT_INCOMPLETE, (f"incomplete: {failed} of {planned} images failed (job.on_error=skip); "
                                 f"see {where}/run.json, and rerun the same command to retry them")
    if not planned or status == "empty":
        if allow_empty:
            return EXIT_OK, None
        manifest = record.get("manifest") or {}
        skipped = counts.get("skipped_rows", 0) or 0
        source = f"{manifest.get('path', 'the manifest')} has {manifest.get('rows_valid', 0)} usable rows"
        return EXIT_INCOMPLETE, (f"nothing generated: {source} ({skipped} skipped); "
                                 "set job.allow_empty=true if an empty run is expected")
    return EXIT_OK, None
