"""Sweeps through Hydra's launcher plugins (conf/hydra/launcher/): the configs compose, a submitit sweep runs
its jobs in other processes and still gets one summary, and every job a sweep planned is listed, even one
that died without a run.json (killed by the scheduler) or never started. The Slurm script passes `bash -n`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose, run_cli

pytestmark = pytest.mark.slow

LAUNCHERS = {
    "submitit_slurm": "SlurmLauncher",
    "submitit_local": "LocalLauncher",
    "joblib": "JoblibLauncher",
}


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_configs_compose_with_the_plugins_schema(name):
    pytest.importorskip(f"hydra_plugins.hydra_{'joblib' if name == 'joblib' else 'submitit'}_launcher")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[f"hydra/launcher={name}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith(LAUNCHERS[name])
    if name == "submitit_slurm":
        for key in ("partition", "account", "gpus_per_node", "tasks_per_node", "timeout_min", "mem_gb",
                    "cpus_per_task", "qos"):  # ours, and one only the plugin's schema has
            assert key in launcher, key
        assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
        assert OmegaConf.get_type(launcher).__name__ == "SlurmQueueConf"  # typed: a typo fails
    if name == "joblib":
        assert launcher.n_jobs == 2
    assert compose(["quantization=none"]).quantization  # the job config is unchanged by the launcher files


def test_command_line_check_lets_launcher_overrides_through():
    from pipeline.cli import CONF_DIR
    from pipeline.config.validate import check_command_line

    args = ["-m", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4", "sampler.steps=2,4"]
    assert check_command_line(args, CONF_DIR, "config") == []


def test_slurm_script_is_valid_bash():
    script = ROOT / "jobs" / "slurm" / "generate.sbatch"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    assert "#SBATCH --gpus-per-node" in text and "#SBATCH --ntasks-per-node" in text
    assert "MASTER_ADDR" in text and "MASTER_PORT" in text and "srun" in text


def test_submitit_sweep_runs_jobs_in_processes_and_lists_the_failed_one(tmp_path):
    """Two jobs through submitit (each in its own process): one completes, one fails with a PipelineError
    (weights not on this machine); one summary at the end lists both, and the sweep exits 3."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    r = run_cli(["-m", "hydra/launcher=submitit_local", "model=tiny-flux,flux.1-dev", "quantization=none",
                 "job.limit=1", "sampler.steps=2", f"hydra.sweep.dir={sweep}"],
                env={"HF_HUB_CACHE": str(tmp_path / "empty-cache")}, timeout=240)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "validated against ConfigStore schema" not in r.stderr
    assert list((sweep / ".submitit").glob("*/*_log.err")), "the jobs did not run through submitit"
    jobs = {j["overrides"]: j for j in json.loads((sweep / "sweep.json").read_text())["jobs"]}
    assert len(jobs) == 2
    ok = jobs["model=tiny-flux quantization=none job.limit=1 sampler.steps=2"]
    assert ok["status"] == "complete" and ok["made"] == 1
    failed = jobs["model=flux.1-dev quantization=none job.limit=1 sampler.steps=2"]
    assert failed["status"] == "failed" and "is not on this machine" in failed["error"]
    assert "error: sweep incomplete: 1 of 2 jobs did not complete" in r.stderr
    assert "Traceback" not in r.stderr


def _job(sweep: Path, name: str, record: dict | None, job_id: str | None = None) -> Path:
    d = sweep / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("- sampler.steps=" + name.split("=")[-1] + "\n")
    if job_id:
        (d / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    id: '{job_id}'\n")
    if record is not None:
        (d / "run.json").write_text(json.dumps(record))
    return d


def test_summary_lists_killed_and_never_started_jobs_with_their_log(tmp_path):
    from pipeline import sweep as sw

    done = {"status": "complete", "overrides": ["sampler.steps=1"],
            "counts": {"planned": 1, "made": 1}, "timing": {"total_s": 1.0}}
    _job(tmp_path, "0_sampler.steps=1", done)
    _job(tmp_path, "1_sampler.steps=2", None, job_id="4242_1")  # killed before it wrote run.json
    _job(tmp_path, "2_sampler.steps=3", {"status": "running", "overrides": ["sampler.steps=3"]})
    log = tmp_path / ".submitit" / "4242_1" / "4242_1_0_log.err"
    log.parent.mkdir(parents=True)
    log.write_text("loading...\nslurmstepd: error: *** JOB 4242 CANCELLED DUE TO TIME LIMIT ***\n\n")
    planned = [[f"sampler.steps={n}"] for n in (1, 2, 3, 4)]
    rows = sw.summarize(tmp_path, print_table=False, planned=planned)
    assert [r["status"] for r in rows] == ["complete", "failed", "running", "failed"]
    assert "TIME LIMIT" in rows[1]["error"] and rows[1]["overrides"] == "sampler.steps=2"
    assert "stopped mid-run" in rows[2]["error"]
    assert rows[3]["overrides"] == "sampler.steps=4" and "never started" in rows[3]["error"]
    assert len(json.loads((tmp_path / "sweep.json").read_text())["jobs"]) == 4
    out = sw.outcome(tmp_path, planned)
    assert out["jobs"] == 4 and len(out["not_complete"]) == 3 and not out["unexpected"]


def test_a_job_that_raised_something_unexpected_leaves_a_failed_record(tmp_path):
    from hydra.core.utils import JobReturn, JobStatus

    from pipeline.sweep import SweepSummary, outcome, planned_jobs

    cfg = OmegaConf.create({"hydra": {"mode": "MULTIRUN", "runtime": {"output_dir": str(tmp_path / "0_a")},
                                      "overrides": {"task": ["sampler.steps=1"]}}})
    from hydra.types import RunMode

    cfg.hydra.mode = RunMode.MULTIRUN
    ret = JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("boom\nmore"))
    SweepSummary().on_job_end(cfg, ret)
    rec = json.loads((tmp_path / "0_a" / "run.json").read_text())
    assert rec["status"] == "failed" and rec["error"] == "RuntimeError: boom" and rec["unexpected"]
    assert outcome(tmp_path)["unexpected"]

    sweeping = OmegaConf.create({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
        "overrides": {"task": ["sampler.steps=1,2", "sampler.seed=0,5", "job.limit=1"]}}})
    assert planned_jobs(sweeping) == [
        ["sampler.steps=1", "sampler.seed=0", "job.limit=1"], ["sampler.steps=1", "sampler.seed=5", "job.limit=1"],
        ["sampler.steps=2", "sampler.seed=0", "job.limit=1"], ["sampler.steps=2", "sampler.seed=5", "job.limit=1"]]
    sweeping.hydra.sweeper._target_ = "some.other.Sweeper"
    assert planned_jobs(sweeping) is None
