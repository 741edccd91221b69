"""Batch safety: stopping on SIGTERM/SIGINT, runs left `running` by a dead process, the output-folder lock, never
replacing a finished image silently, empty runs, and rows (not problems) counted as skipped."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, run_config
from pipeline import runner
from pipeline.errors import RunInterrupted
from pipeline.outputs.existing import WouldOverwrite
from pipeline.outputs.lock import FolderLock, OutputLocked, read_holder
from pipeline.runner import run_job

FAST = ["job.progress=none", "quantization=none", "sampler.steps=1"]
HOST = socket.gethostname()


def run(out: Path, *overrides: str) -> dict:
    return run_job(run_config([*FAST, *overrides]), out)


def no_model(monkeypatch):
    monkeypatch.setattr(runner, "load_models", lambda *a, **k: pytest.fail("the model was loaded"))


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*_*.png"))


def index_files(folder: Path) -> list[str]:
    return sorted(json.loads(line)["file"] for line in (folder / "index.jsonl").read_text().splitlines())


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# --- signals ------------------------------------------------------------------------------------------------


def test_sigterm_stops_the_command_cleanly_and_says_how_to_resume(tmp_path, write_manifest):
    """As a scheduler stops a job (SLURM, `timeout`, `docker stop`). SIGINT goes the same way in-process below; the
    command line's 128 + signal for it is checked in test_exit_codes.py."""
    sig = signal.SIGTERM
    manifest = write_manifest("m.txt", "\n".join(f"prompt number {i}" for i in range(10)))
    out = tmp_path / "run"
    overrides = [f"job.manifest={manifest}", "job.batch_size=1", "sampler.steps=24", "quantization=none",
                 "job.progress=plain"]
    log_out, log_err = (open(tmp_path / name, "w+") for name in ("stdout", "stderr"))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *overrides, f"hydra.run.dir={out}"], cwd=ROOT,
                            stdout=log_out, stderr=log_err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while not list(out.glob("*_*.json")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        os.kill(proc.pid, sig)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    err = (tmp_path / "stderr").read_text()
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted", err
    assert record["signal"] == sig.name
    assert record["resume"] == "python -m pipeline " + shlex.join([*overrides, f"job.output_dir={out}"])
    made = pngs(out)
    assert 1 <= len(made) < 10 and record["counts"]["made"] == len(made)
    assert not list(out.glob("*.tmp-*"))  # nothing half-written, under any name
    for png in made:
        Image.open(out / png).verify()
        assert (out / png).with_suffix(".json").exists()
    assert index_files(out) == made
    assert "Traceback" not in err, err
    assert f"error: interrupted by {sig.name}; rerun the same command to finish" in err, err
    assert code == 128 + sig, err  # 143 / 130: the CLI maps RunInterrupted


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "KeyboardInterrupt"])
def test_a_signal_in_process_stops_at_the_next_denoising_step_and_restores_the_handlers(tmp_path, monkeypatch, how):
    """Ctrl-C, SIGTERM, and a KeyboardInterrupt from Python's own SIGINT handler (where the run's cannot be installed:
    not the main thread) in the second of 6 steps of the second image: the first image is kept, the second dropped."""
    real, steps = runner.generate_batch, []

    def signal_in_step_2(pipe, step_index, timestep, kwargs):
        steps.append(step_index)
        if len(steps) == 6 + 2:
            if how == "KeyboardInterrupt":
                raise KeyboardInterrupt
            os.kill(os.getpid(), getattr(signal, how))
        return kwargs

    monkeypatch.setattr(runner, "generate_batch",
                        lambda pipe, family, batch, on_step=None: real(pipe, family, batch, [signal_in_step_2, on_step]))
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(RunInterrupted) as e:
        run(tmp_path / "out", "job.limit=3", "job.batch_size=1", "sampler.steps=6")
    sig = signal.SIGTERM if how == "SIGTERM" else signal.SIGINT
    assert (e.value.signum, e.value.exit_code) == (sig, 128 + sig)
    assert steps == [0, 1, 2, 3, 4, 5, 0, 1]  # stopped after the step in progress
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert (record["status"], record["signal"], record["counts"]["made"]) == ("interrupted", sig.name, 1)
    assert record["resume"] == f"python -m pipeline job.output_dir={tmp_path / 'out'}"  # run_job got no overrides
    assert pngs(tmp_path / "out") == ["cat_0.png"] and index_files(tmp_path / "out") == ["cat_0.png"]


# --- a run that never finished ---------------------------------------------------------------------------------


def test_a_run_left_running_by_a_dead_process_is_recorded_as_killed(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    pid = dead_pid()
    (out / "run.json").write_text(json.dumps(
        {"status": "running", "started_at": "2025-01-02T03:04:05+0000", "finished_at": None, "pid": pid,
         "host": HOST, "counts": {"planned": 1, "made": 0}}))
    record = run(out, "job.limit=1")
    assert record["status"] == "complete" and (record["pid"], record["host"]) == (os.getpid(), HOST)
    assert record["previous_runs"] == [
        {"status": "killed", "killed": f"process {pid} is gone", "started_at": "2025-01-02T03:04:05+0000",
         "finished_at": None, "counts": {"planned": 1, "made": 0}, "pid": pid, "host": HOST}]
    assert (f"the previous run into {out} (pid {pid} on host {HOST}, started 2025-01-02T03:04:05+0000) never "
            f"finished: process {pid} is gone; recorded as killed in run.json's previous_runs") in caplog.text

    # On another machine: the lock it held is free, so it is not running either.
    (out / "run.json").write_text(json.dumps({**record, "status": "running", "pid": 4242, "host": "gpu-node-7"}))
    record = run(out, "job.limit=1")
    assert record["counts"]["made"] == 0 and [r["status"] for r in record["previous_runs"]] == ["killed", "killed"]
    assert record["previous_runs"][-1]["killed"] == "it ran on host gpu-node-7, and the folder lock it held there is free"


# --- one run per folder ---------------------------------------------------------------------------------------


def test_a_second_run_into_a_locked_folder_refuses_naming_the_holder_or_waits(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)  # a run on another machine holds it
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b'{"pid": 4321, "host": "gpu-node-7", "started_at": "2025-01-02T03:04:05+0000"}')
    no_model(monkeypatch)
    with pytest.raises(OutputLocked) as e:
        run(out, "job.limit=1")
    assert str(e.value) == (
        f"output folder {out} is in use by another run (pid 4321 on host gpu-node-7 (another machine), started "
        "2025-01-02T03:04:05+0000); wait for it, use another job.output_dir, or set job.wait_for_lock=SECONDS to wait")
    os.close(fd)
    assert not (out / "run.json").exists()

    holder = FolderLock(out).acquire()  # this host; a second open file description conflicts like a process
    started = read_holder(out)["started_at"]
    t = time.perf_counter()
    with pytest.raises(OutputLocked) as e:
        run(out, "job.limit=1", "job.wait_for_lock=0.3")
    assert time.perf_counter() - t >= 0.3
    assert str(e.value) == (
        f"output folder {out} is in use by another run (pid {os.getpid()} on host {HOST}, started {started}) "
        "(still in use after waiting 0.3 s); wait for it, use another job.output_dir, or set "
        "job.wait_for_lock=SECONDS to wait")
    monkeypatch.undo()
    threading.Timer(0.5, holder.release).start()
    record = run(out, "job.limit=1", "job.wait_for_lock=60")  # waits for the holder, then runs
    assert record["status"] == "complete" and record["counts"]["made"] == 1
    assert read_holder(out) == {}  # released (the file stays: deleting a lock file races)


# --- never replace a finished image silently -----------------------------------------------------------------


def test_changed_settings_refuse_to_replace_finished_images_unless_overwrite(tmp_path, write_manifest, monkeypatch):
    manifest = write_manifest("m.txt", "a red cube\na blue ball\na green cone\n")
    out = tmp_path / "out"
    run(out, f"job.manifest={manifest}")
    before = {p: (out / p).read_bytes() for p in pngs(out)}
    with monkeypatch.context() as m:
        no_model(m)
        with pytest.raises(WouldOverwrite) as e:
            run(out, f"job.manifest={manifest}", "sampler.steps=2", "sampler.guidance=2.0")
    assert str(e.value) == (
        f"3 finished images in {out} were made with other settings and would be replaced:\n"
        "  00000_0.png: steps 1 -> 2, guidance 3.5 -> 2.0\n"
        "  00001_1.png: steps 1 -> 2, guidance 3.5 -> 2.0\n"
        "  ... and 1 more\n"
        "Set job.overwrite=true to replace them, or set a new job.output_dir to keep them.")
    assert {p: (out / p).read_bytes() for p in pngs(out)} == before

    with (out / "index.jsonl").open("a") as f:  # as the old runner left it: a line twice, one for a lost file
        f.write((out / "index.jsonl").read_text().splitlines()[0] + "\n" + '{"file": "gone_9.png"}\n')
    record = run(out, f"job.manifest={manifest}", "sampler.steps=2", "job.overwrite=true")
    assert record["counts"]["made"] == 3 and record["counts"]["replaced"] == 3
    assert {p: (out / p).read_bytes() for p in pngs(out)} != before
    lines = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(i["file"] for i in lines) == pngs(out) == ["00000_0.png", "00001_1.png", "00002_2.png"]
    assert all(i["steps"] == 2 and i["settings_hash"] == json.loads((out / i["file"]).with_suffix(".json")
                                                                    .read_text())["settings_hash"] for i in lines)


# --- nothing planned; rows, not problems ---------------------------------------------------------------------


def test_an_empty_manifest_finishes_empty_without_loading_the_model(tmp_path, write_manifest, monkeypatch):
    manifest = write_manifest("empty.txt", "# nothing yet\n")
    no_model(monkeypatch)
    record = run(tmp_path / "out", f"job.manifest={manifest}")
    assert record["status"] == "empty" and record["reason"] == "the manifest has 0 usable rows (0 skipped)"
    assert record["counts"]["planned"] == 0 and json.loads((tmp_path / "out" / "run.json").read_text()) == record


def test_skipped_rows_counts_rows_not_problems(tmp_path, write_manifest, monkeypatch):
    manifest = write_manifest("m.jsonl", '{"id": "bad id!", "prompt": ""}\n')  # one row, two problems
    no_model(monkeypatch)
    record = run(tmp_path / "out", f"job.manifest={manifest}", "job.on_error=skip")
    assert [(s["line"], s["field"]) for s in record["skipped_rows"]] == [(1, "prompt"), (1, "id")]
    assert record["counts"]["skipped_rows"] == 1
    assert record["status"] == "empty" and record["reason"] == "the manifest has 0 usable rows (1 skipped)"
