"""Exit statuses scripts can trust, checked in-process: the record -> status mapping, the command-line
pre-check (bad values, options, added keys, sweeps), and the CLI's handling of interrupts and incomplete runs.
The end-to-end runs (one per kind) are in test_cli.py."""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import compose
from pipeline.cli import CONF_DIR
from pipeline.outcome import exit_status
from pipeline.config.validate import check_command_line

# every conf/model option, as the message lists them (sorted)
MODELS = ", ".join(sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))


def check(*args: str, config_name: str = "config") -> list[str]:
    return check_command_line(list(args), CONF_DIR, config_name)


def record(status="complete", planned=4, made=4, failed=0, skipped_rows=0, **extra):
    return {"status": status, "output_dir": "/out",
            "manifest": {"path": "jobs/x.txt", "rows_total": skipped_rows + planned, "rows_valid": planned},
            "counts": {"planned": planned, "made": made, "skipped_existing": 0, "failed": failed,
                       "skipped_rows": skipped_rows}, **extra}


EMPTY = ("nothing generated: jobs/x.txt has 0 usable rows (2 skipped); "
         "set job.allow_empty=true if an empty run is expected")
FAILED = ("incomplete: 1 of 4 images failed (job.on_error=skip); see /out/run.json, "
          "and rerun the same command to retry them")


@pytest.mark.parametrize(
    "rec,allow_empty,expected",
    [
        (record(), False, (0, None)),
        (record(made=0), False, (0, None)),  # all there from an earlier run
        # nothing planned: empty whatever the runner called it
        (record(planned=0, made=0, skipped_rows=2), False, (3, EMPTY)),
        (record(status="empty", planned=0, made=0, skipped_rows=2), False, (3, EMPTY)),
        (record(status="empty", planned=0, made=0, skipped_rows=2), True, (0, None)),
        (record(planned=0, made=0, skipped_rows=2), True, (0, None)),
        # some images failed (on_error=skip): incomplete, even with allow_empty
        (record(made=3, failed=1), False, (3, FAILED)),
        (record(status="incomplete", made=3, failed=1), True, (3, FAILED)),
        # a sweep job that never started (pipeline/cli.py _write_failure)
        ({"status": "failed", "error": "Model 'x' is not on this machine\nhf download ..."}, False,
         (3, "failed: Model 'x' is not on this machine")),
    ],
)
def test_exit_status_of_a_finished_run(rec, allow_empty, expected):
    assert exit_status(rec, allow_empty) == expected


@pytest.mark.parametrize(
    "override,message",
    [
        ("sampler.steps=four", "sampler.steps: 'four' is not an integer"),
        ("job.on_error=ignore", "job.on_error: 'ignore' is not one of abort, skip"),
        ("quantization=int4_r64", "quantization=int4_r64: no such option; available: auto, int4_r128, int4_r32, "
                                  "manual, none, nvfp4_r128, nvfp4_r32 (did you mean int4_r32?)"),
        ("model=tiny-flx", f"model=tiny-flx: no such option; available: {MODELS} (did you mean tiny-flux?)"),
        ("sampler.guidance=high", "sampler.guidance: 'high' is not a number"),
        ("job.overwrite=maybe", "job.overwrite: 'maybe' is not true or false"),
        ("hydra.run.dir=/tmp/a=b", "hydra.run.dir=/tmp/a=b: cannot parse this override"),
    ],
)
def test_wrong_types_choices_and_options_get_one_clear_message(override, message):
    problems = check(override, "hydra.run.dir=/tmp/x")
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_added_keys_are_checked_like_any_other():
    assert check("+sampler.stpes=4") == [
        "sampler.stpes: unknown key; did you mean sampler.steps? (keys under sampler: name, steps, guidance, "
        "true_cfg_scale, height, width, negative_prompt, seed, seed_policy, max_sequence_length, dtype, device, "
        "scheduler)"]
    [problem] = check("+job.prompt_column=Prompts")
    assert problem.startswith("job.prompt_column: unknown key; did you mean job.columns.prompt? (keys under job: ")
    [problem] = check("++sampler.scheduler.shfit=3")
    assert problem.startswith("sampler.scheduler.shfit: unknown key; did you mean sampler.scheduler.shift?")
    assert check("+sampler.steps=4") == [] and check("++sampler.steps=4") == []


def test_every_value_of_a_sweep_is_checked_before_any_job_starts():
    assert check("-m", "sampler.steps=1,four", "sampler.seed=0,5") == ["sampler.steps: 'four' is not an integer"]
    assert check("-m", "job.on_error=choice(skip,ignore)") == ["job.on_error: 'ignore' is not one of abort, skip"]
    assert check("-m", "sampler.seed=range(0,3)", "model=tiny-flux,tiny-flx") == [
        f"model=tiny-flx: no such option; available: {MODELS} (did you mean tiny-flux?)"]
    assert check("-m", "sampler.steps=1,2", "sampler.seed=0,5", "model=tiny-flux,tiny-qwen-image",
                 "quantization=glob(int4*)", "hydra.sweep.dir=/tmp/s") == []


def test_a_sweep_refuses_job_output_dir():
    assert check("-m", "sampler.steps=1,2", "job.output_dir=/tmp/o") == [
        "job.output_dir: not used in a sweep (-m): each job writes into its own folder under hydra.sweep.dir; "
        "set hydra.sweep.dir=DIR instead (or job.output_dir=null)"]
    assert check("job.output_dir=/tmp/o") == []


def test_hydra_settings_and_the_quantize_config_pass_through():
    assert check("hydra.run.dir=/tmp/x", "hydra.sweep.dir=/tmp/y", "hydra.job.chdir=false") == []
    assert check("--help") == [] and check("--cfg", "job") == []
    assert check("quantization.calibration.steps=x", config_name="quantize") == [
        "quantization.calibration.steps: 'x' is not an integer"]


def test_the_precheck_is_cheap():
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        check("-m", "model=tiny-flux,tiny-qwen-image", "sampler.seed=range(0,50)", "job.limit=2")
        best = min(best, time.perf_counter() - t)
    assert best < 0.5, best


def test_hydra_run_dir_follows_job_output_dir():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def run_dir(overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True).hydra.run.dir

    assert run_dir(["job.output_dir=/data/run1"]) == "/data/run1"
    assert run_dir([]).startswith("outputs/20")
    assert run_dir(["job.output_dir=/data/run1", "hydra.run.dir=/elsewhere"]) == "/elsewhere"
    assert compose(["job.output_dir=/data/run1"]).job.output_dir == "/data/run1"


@pytest.fixture
def cli_in_process(monkeypatch, tmp_path):
    """Run `python -m pipeline ARGS` in this process with a stand-in for run_job; returns (exit code, stderr)."""
    import pipeline.cli as cli
    import pipeline.runner as runner

    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def run(fake_run_job, *args):
        monkeypatch.setattr(runner, "run_job", fake_run_job)
        monkeypatch.setattr(sys, "argv", ["pipeline", f"hydra.run.dir={tmp_path / 'run'}", "job.progress=none", *args])
        with pytest.raises(SystemExit) as e:
            cli.run_entry(cli.hydra_main)
        return e.value.code

    yield run
    for h in root.handlers[:]:
        if h not in saved[0]:
            root.removeHandler(h)
            h.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_an_interrupt_exits_128_plus_the_signal_with_one_line(cli_in_process, capsys):
    from pipeline.errors import RunInterrupted

    def interrupted(cfg, out_dir, overrides=None):
        raise RunInterrupted(signal.SIGTERM, out_dir)

    assert cli_in_process(interrupted) == 143
    err = capsys.readouterr().err
    assert err.startswith("error: interrupted by SIGTERM; rerun the same command to finish") and "Traceback" not in err


def test_a_run_with_failed_images_exits_3(cli_in_process, capsys):
    def some_failed(cfg, out_dir, overrides=None):
        return record(made=3, failed=1, output_dir=str(out_dir))

    assert cli_in_process(some_failed, "job.on_error=skip") == 3
    err = capsys.readouterr().err
    assert "error: incomplete: 1 of 4 images failed (job.on_error=skip)" in err
