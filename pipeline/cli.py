"""Command-line entry: `python -m pipeline [overrides]` or `svdq-batch [overrides]` (Hydra).

Exit status (also for `svdq-quantize`), so that scripts can trust it:
  0    every image the run planned is on disk (made now or earlier); with job.allow_empty=true also
       when nothing was planned
  2    user error: a bad key, value or config option, a bad manifest, missing weights... one clear
       message on stderr, no traceback
  3    the run ended incomplete: nothing was planned, some images failed (job.on_error=skip), or in
       a sweep (-m) any job failed or was incomplete (a failing job is recorded and the sweep goes on)
  130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM: what was finished is kept; rerun to finish
  1    anything else (a bug: it keeps its traceback)
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path

# Never reach for the network: a missing model must fail fast with our message, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# conf/hydra/launcher/{submitit_slurm,submitit_local,joblib}.yaml extend the launcher plugins' configs of the
# same names; Hydra 1.3 merges them with the plugin's schema (so typos there fail) and warns that it does.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pipeline.config import register_configs, to_run_config  # noqa: E402
from pipeline.config.validate import check_command_line  # noqa: E402
from pipeline.errors import PipelineError, RunInterrupted  # noqa: E402
from pipeline.outcome import EXIT_INCOMPLETE, EXIT_USER_ERROR, exit_status  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
log = logging.getLogger("pipeline")


def slug(text: str) -> str:
    """A folder-safe name for a sweep job's overrides (`sampler.steps=4,model=tiny-flux`)."""
    s = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", str(text)).strip("_")
    return s[:120] or "base"


def first_set(*values):
    """`${first_set:${job.output_dir},outputs/...}`: the first value that is neither null nor empty."""
    return next((v for v in values if v not in (None, "")), None)


if not OmegaConf.has_resolver("slug"):
    OmegaConf.register_new_resolver("slug", slug)
if not OmegaConf.has_resolver("first_set"):
    OmegaConf.register_new_resolver("first_set", first_set)
register_configs()

def run_entry(hydra_fn, config_name: str = "config") -> None:
    """Check the command line against the schema and the config groups, then hand over to Hydra.

    Bad keys, values and group options exit 2 here, one line each; a sweep (-m) with a job that did
    not complete exits 3 once Hydra has printed its table; an interrupt exits 128 + the signal.
    """
    from pipeline import sweep

    problems = check_command_line(sys.argv[1:], CONF_DIR, config_name)
    if problems:
        for msg in problems:
            print(f"error: {msg}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sweep.take_outcome()
    aborted = None
    try:
        hydra_fn()
    except SystemExit as e:
        # Hydra gave up on a sweep (a job raised, or a launcher lost a job: a scheduler kill) and printed
        # why: still list every job, then say which did not complete.
        if e.code != 1 or not sweep.summarize_aborted():
            raise
        aborted = e
    except RunInterrupted as e:
        exit_on_interrupt(e)
    except KeyboardInterrupt:
        print("error: interrupted by SIGINT", file=sys.stderr)
        sys.exit(130)
    outcome = sweep.take_outcome()
    if outcome and outcome["not_complete"]:
        bad = outcome["not_complete"]
        print(f"error: sweep incomplete: {len(bad)} of {outcome['jobs']} jobs did not complete "
              f"(see {outcome['sweep_dir']}/sweep.md):", file=sys.stderr)
        for job, why in bad:
            print(f"  {job}: {why}", file=sys.stderr)
        # a job that raised something unexpected is a bug (exit 1, Hydra printed its traceback)
        sys.exit(1 if outcome.get("unexpected") else EXIT_INCOMPLETE)
    if aborted is not None:
        raise aborted


def exit_on_user_error(e: PipelineError) -> None:
    """Inside a Hydra task (Hydra would print a traceback): one clear message, exit status 2."""
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def exit_on_interrupt(e: RunInterrupted) -> None:
    """Inside a Hydra task (Hydra would report it as a failure, status 1): one line, 128 + signal."""
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)


def main() -> None:
    if sys.argv[1:2] == ["inspect"]:  # `svdq-batch inspect FILE...`: describe files, no Hydra run
        from pipeline.inspect import main as inspect_main

        sys.exit(inspect_main(sys.argv[2:]))
    run_entry(hydra_main)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> dict | None:
    from pipeline.runner import run_job

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    # hydra.run.dir follows job.output_dir (conf/config.yaml), so .hydra/ and the log land there too;
    # job.output_dir still wins over an explicit hydra.run.dir. A sweep refuses job.output_dir.
    out_dir = Path(cfg.job.output_dir) if cfg.job.output_dir and not multirun else Path(hc.runtime.output_dir)
    try:
        run = to_run_config(cfg)
        record = run_job(run, out_dir, list(hc.overrides.task))
    except PipelineError as e:
        if multirun:
            log.error("job %s failed: %s", hc.job.num, e)
            _write_failure(out_dir, e, list(hc.overrides.task))
            return None
        exit_on_user_error(e)
    except RunInterrupted as e:
        if multirun:  # stop the whole sweep, after listing what is there
            _summarize_quietly(Path(hc.sweep.dir))
        exit_on_interrupt(e)
    c = record["counts"]
    log.info(
        "done: %d made, %d already there, %d failed, %d rows skipped -> %s",
        c["made"], c["skipped_existing"], c["failed"], c["skipped_rows"], out_dir,
    )
    code, why = exit_status(record, bool(cfg.job.allow_empty))
    if code and not multirun:  # a sweep's callback collects every job's status (pipeline/sweep.py)
        print(f"error: {why}", file=sys.stderr)
        sys.exit(code)
    return record


def _summarize_quietly(sweep_dir: Path) -> None:
    from pipeline.sweep import summarize

    try:
        if sweep_dir.is_dir():
            summarize(sweep_dir, print_table=False)
    except Exception as e:  # never hide the interrupt behind a summary problem
        log.warning("could not write the sweep summary: %s", e)


def _write_failure(out_dir: Path, error: Exception, overrides: list[str]) -> None:
    """A sweep job that never got going still leaves a run.json, so the summary can list it."""
    from pipeline.outputs.atomic import atomic_write_json
    from pipeline.record import RUN_FILE

    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / RUN_FILE).exists():
        atomic_write_json(out_dir / RUN_FILE, {"status": "failed", "error": str(error), "overrides": overrides})


if __name__ == "__main__":
    main()
