"""The command line as a user drives it: kill and resume, a 2x2 sweep, clear errors with exit code 2, runs that
made nothing with exit code 3 (the in-process checks of the same are in test_exit_codes.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_cli, run_config
from pipeline.runner import run_job

pytestmark = pytest.mark.slow
SLOW_RUN = ["job.batch_size=1", "sampler.steps=24", "job.progress=plain", "quantization=none"]


def finished_pairs(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("*_*.json") if (folder / f"{p.stem}.png").exists()}


def test_run_killed_mid_batch_resumes_making_exactly_the_missing_images(tmp_path, write_manifest):
    manifest = write_manifest("m.txt", "\n".join(f"prompt number {i}" for i in range(10)))
    out = tmp_path / "run"
    args = [f"job.manifest={manifest}", f"hydra.run.dir={out}", *SLOW_RUN]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(finished_pairs(out)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = finished_pairs(out)
    assert 3 <= len(done_at_kill) < 10, "the run must be killed part-way"
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    for png in out.glob("*_*.png"):  # no half-written image under a final name
        Image.open(png).verify()

    again = run_cli(args)
    assert again.returncode == 0, again.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["counts"]["skipped_existing"] == len(done_at_kill)
    assert record["counts"]["made"] == 10 - len(done_at_kill)
    made = {i["file"][:-4] for i in record["images"]}
    assert made.isdisjoint(done_at_kill) and made | done_at_kill == {f"{i:05d}_{i}" for i in range(10)}
    assert not list(out.glob("*.tmp-*"))
    index = [json.loads(line)["file"] for line in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(index) == sorted(f"{i:05d}_{i}.png" for i in range(10))

    # Same images as a run never interrupted.
    ref = tmp_path / "ref"
    run_job(run_config([f"job.manifest={manifest}", *SLOW_RUN[:2], "quantization=none", "job.progress=none"]), ref)
    for i in range(10):
        a, b = (np.asarray(Image.open(d / f"{i:05d}_{i}.png")) for d in (out, ref))
        assert np.array_equal(a, b), i


def test_two_by_two_sweep_writes_four_job_folders_and_a_summary(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli(["-m", "sampler.steps=1,2", "sampler.seed=0,5", "job.limit=2", f"hydra.sweep.dir={sweep}"])
    assert r.returncode == 0, r.stderr
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir())
    assert [d.name.split("_")[0] for d in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for d in jobs:
        rec = json.loads((d / "run.json").read_text())
        assert rec["status"] == "complete" and rec["counts"]["made"] == 2
        steps, seed = rec["config"]["sampler"]["steps"], rec["config"]["sampler"]["seed"]
        seen.add((steps, seed))
        assert (d / f"cat_{seed}.png").exists() and (d / "grid.png").exists()
    assert seen == {(1, 0), (1, 5), (2, 0), (2, 5)}
    summary = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert len(summary) == 4 and all(j["made"] == 2 and j["time_s"] > 0 and j["peak_mem_mib"] > 0 for j in summary)
    assert "sampler.steps=1 sampler.seed=0" in summary[0]["overrides"]
    md = (sweep / "sweep.md").read_text().splitlines()
    assert md[0].startswith("| job | overrides | status | made") and len(md) == 6
    assert "sampler.steps" in r.stdout and "all jobs: job.limit=2" in r.stdout


def test_sweep_job_with_bad_settings_is_listed_as_failed_and_the_rest_run(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli(["-m", "model=tiny-flux,flux.1-dev", "job.limit=1", f"hydra.sweep.dir={sweep}"],
                env={"HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    assert r.returncode == 3, r.stderr  # the sweep ran to its end, but not every job completed
    jobs = {j["overrides"]: j for j in json.loads((sweep / "sweep.json").read_text())["jobs"]}
    assert jobs["model=tiny-flux job.limit=1"]["status"] == "complete"
    failed = jobs["model=flux.1-dev job.limit=1"]
    assert failed["status"] == "failed" and "is not on this machine" in failed["error"]
    assert "model=flux.1-dev" in r.stdout  # the table came first
    assert f"error: sweep incomplete: 1 of 2 jobs did not complete (see {sweep}/sweep.md):\n" in r.stderr, r.stderr
    [line] = [ln for ln in r.stderr.splitlines() if ln.startswith("  1_")]
    assert line.startswith("  1_job.limit=1,model=flux.1-dev: failed: ")
    assert "'flux.1-dev' is not on this machine" in line
    assert "Traceback" not in r.stderr


def test_a_run_that_made_nothing_exits_3_and_says_why(tmp_path, write_manifest):
    manifest = write_manifest("bad.jsonl", '{"prompt": ""}\n{"steps": 3}\n')
    r = run_cli([f"job.manifest={manifest}", "job.on_error=skip", f"hydra.run.dir={tmp_path / 'out'}"])
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: nothing generated: {manifest} has 0 usable rows (2 skipped); "
        "set job.allow_empty=true if an empty run is expected"), r.stderr
    assert "Traceback" not in r.stderr


def test_job_output_dir_holds_the_hydra_folder_and_the_log(tmp_path, write_manifest):
    """With job.output_dir, nothing goes to a stray outputs/<date>/<time>/ (cwd here is tmp_path); an empty run is
    fine with job.allow_empty=true."""
    manifest = write_manifest("empty.txt", "")
    out = tmp_path / "mine"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    r = run_cli([f"job.manifest={manifest}", f"job.output_dir={out}", "job.allow_empty=true"], cwd=tmp_path,
                env={"PYTHONPATH": path})
    assert r.returncode == 0, r.stderr
    assert (out / ".hydra" / "config.yaml").exists() and (out / "pipeline.log").exists() and (out / "run.json").exists()
    assert "done: 0 made" in (out / "pipeline.log").read_text()
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "args,phrases",
    [
        (["sampler.stpes=4"], ["sampler.stpes: unknown key; did you mean sampler.steps?"]),
        (["+job.prompt_column=Prompts"], ["error: job.prompt_column: unknown key; did you mean job.columns.prompt?"]),
        (["sampler.steps=four"], ["error: sampler.steps: 'four' is not an integer\n"]),
        (["sampler.height=1000"], ["sampler.height: must be a multiple of 16", "992 or 1008"]),
        (["model=flux.1-dev"], ["Model 'flux.1-dev' is not on this machine", "hf download black-forest-labs/FLUX.1-dev"]),
        (["job.manifest=tests/data/bad_rows.jsonl"], ["tests/data/bad_rows.jsonl:2: prompt: missing",
                                                      "tests/data/bad_rows.jsonl:3: steps: expected an integer"]),
    ],
)
def test_user_errors_exit_2_with_a_clear_message_and_no_traceback(args, phrases, tmp_path):
    r = run_cli([*args, f"hydra.run.dir={tmp_path / 'out'}"], env={"HF_HUB_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2, (r.stdout, r.stderr)
    for phrase in phrases:
        assert phrase in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not list((tmp_path / "out").glob("*.png"))


def test_svdq_quantize_checks_its_command_line_the_same_way(tmp_path):
    r = run_cli(["quantization=int4_r64", f"hydra.run.dir={tmp_path / 'out'}"], module="pipeline.quantize_job")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr == ("error: quantization=int4_r64: no such option; available: auto, int4_r128, int4_r32, manual, "
                        "none, nvfp4_r128, nvfp4_r32 (did you mean int4_r32?)\n")
