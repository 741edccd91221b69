"""Command-line entry: `python -m pipeline [overrides]` or `svdq-batch [overrides]` (Hydra).

User errors (bad config value, bad manifest row, missing weights) print one clear message and
exit with status 2; in a sweep (-m) a failing job is recorded and the sweep goes on.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

# Never reach for the network: a missing model must fail fast with our message, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pipeline.config import register_configs, to_run_config  # noqa: E402
from pipeline.config.validate import unknown_override_keys  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
log = logging.getLogger("pipeline")


def slug(text: str) -> str:
    """A folder-safe name for a sweep job's overrides (`sampler.steps=4,model=tiny-flux`)."""
    s = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", str(text)).strip("_")
    return s[:120] or "base"


if not OmegaConf.has_resolver("slug"):
    OmegaConf.register_new_resolver("slug", slug)
register_configs()


def run_entry(hydra_fn) -> None:
    """Check command-line keys against the schema (with suggestions), then hand over to Hydra."""
    problems = unknown_override_keys(sys.argv[1:])
    if problems:
        for key, msg in problems:
            print(f"error: {key}: {msg}", file=sys.stderr)
        sys.exit(2)
    hydra_fn()


def exit_on_user_error(e: PipelineError) -> None:
    """Inside a Hydra task (Hydra would print a traceback): one clear message, exit status 2."""
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


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
    out_dir = Path(hc.runtime.output_dir)
    if cfg.job.output_dir and not multirun:
        out_dir = Path(cfg.job.output_dir)
    try:
        run = to_run_config(cfg)
        record = run_job(run, out_dir, list(hc.overrides.task))
    except PipelineError as e:
        if multirun:
            log.error("job %s failed: %s", hc.job.num, e)
            _write_failure(out_dir, e, list(hc.overrides.task))
            return None
        exit_on_user_error(e)
    c = record["counts"]
    log.info(
        "done: %d made, %d already there, %d failed, %d rows skipped -> %s",
        c["made"], c["skipped_existing"], c["failed"], c["skipped_rows"], out_dir,
    )
    return record


def _write_failure(out_dir: Path, error: Exception, overrides: list[str]) -> None:
    """A sweep job that never got going still leaves a run.json, so the summary can list it."""
    from pipeline.outputs.atomic import atomic_write_json
    from pipeline.runner import RUN_FILE

    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / RUN_FILE).exists():
        atomic_write_json(out_dir / RUN_FILE, {"status": "failed", "error": str(error), "overrides": overrides})


if __name__ == "__main__":
    main()
