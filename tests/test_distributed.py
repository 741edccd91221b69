"""One image, one set of bytes: batches are formed over the whole job (a resumed or data-parallel run makes the bytes
a clean one-process run makes); data-parallel runs under torchrun share a job's batches by rank (gloo on CPU)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, run_config
from pipeline import distributed
from pipeline.runner import run_job

# --- launch detection (no processes) -------------------------------------------------------------------------


def test_launch_is_read_from_torchrun_and_slurm_environments():
    assert distributed.detect({}) == distributed.Launch()
    tr = distributed.detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                             "MASTER_PORT": "29500"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.launcher, tr.is_main) == (3, 4, 1, "torchrun", False)
    assert [b for b in range(8) if tr.owns(b)] == [3, 7]
    slurm = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0",
             "SLURM_STEP_ID": "0"}
    with pytest.raises(distributed.LaunchError, match="MASTER_ADDR and MASTER_PORT"):
        distributed.detect(slurm)
    s = distributed.detect({**slurm, "MASTER_ADDR": "node1", "MASTER_PORT": "29500"})
    assert (s.rank, s.world_size, s.local_rank, s.launcher) == (2, 4, 0, "slurm")
    # a batch script (no srun step) of a 4-task allocation is one process
    assert distributed.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}).world_size == 1
    assert distributed.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}).world_size == 1


# --- one image, one set of bytes (in-process) ----------------------------------------------------------------


def test_a_partly_finished_batch_is_made_whole_and_only_its_missing_image_written(tmp_path, write_manifest):
    manifest = write_manifest("m.txt", "\n".join(f"prompt number {i}" for i in range(5)))
    cfg = run_config([f"job.manifest={manifest}", "job.batch_size=2", "sampler.steps=2", "quantization=none",
                      "job.progress=none", "job.grid=false"])
    clean = tmp_path / "clean"
    run_job(cfg, clean)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for stem in ("00002_2", "00004_4"):  # 00002_2 is half of batch [00002_2, 00003_3]; 00004_4 a whole batch
        for ext in ("png", "json"):
            shutil.copy2(clean / f"{stem}.{ext}", resumed / f"{stem}.{ext}")
    kept = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in resumed.iterdir()}
    record = run_job(cfg, resumed)
    assert record["counts"]["made"] == 3 and record["counts"]["skipped_existing"] == 2
    assert sorted(i["file"] for i in record["images"]) == ["00000_0.png", "00001_1.png", "00003_3.png"]
    for name, (mtime, data) in kept.items():  # the batch's finished image is not rewritten
        assert (resumed / name).stat().st_mtime_ns == mtime and (resumed / name).read_bytes() == data
    for i in range(5):  # 00003_3 was made in a batch with 00002_2 again: the clean run's bytes
        assert (resumed / f"0000{i}_{i}.png").read_bytes() == (clean / f"0000{i}_{i}.png").read_bytes()
    index = [json.loads(line)["file"] for line in (resumed / "index.jsonl").read_text().splitlines()]
    assert sorted(index) == [f"0000{i}_{i}.png" for i in range(5)]


# --- torchrun: 2 ranks on gloo -------------------------------------------------------------------------------

ROWS = 8  # batch_size 2: batches 0..3, rank 0 makes 0 and 2, rank 1 makes 1 and 3
ARGS = ["job.batch_size=2", "sampler.steps=50", "quantization=none", "job.progress=plain"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # torchrun sets 1 per rank: the same here


def torchrun(manifest: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline",
         f"job.manifest={manifest}", f"job.output_dir={out}", *ARGS],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def one_process(manifest: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", f"job.manifest={manifest}", f"job.output_dir={out}",
                           *ARGS], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def images(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*_*.png")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A clean 2-rank torchrun run and a one-process run of the same job (OMP_NUM_THREADS=1 for both)."""
    tmp = tmp_path_factory.mktemp("dist")
    manifest = tmp / "m.txt"
    manifest.write_text("\n".join(f"prompt number {i}" for i in range(ROWS)))
    ranked = torchrun(manifest, tmp / "ranked")
    single = one_process(manifest, tmp / "single")  # meanwhile: the two use the machine's 2 cores at most
    out, _ = ranked.communicate(timeout=300)
    return manifest, tmp, ranked.returncode, out, single


@pytest.mark.slow
def test_torchrun_ranks_make_the_one_process_runs_files_and_one_record(runs):
    manifest, tmp, code, out, single = runs
    assert code == 0, out
    assert single.returncode == 0, single.stderr
    ranked, one = tmp / "ranked", tmp / "single"
    assert len(images(one)) == ROWS and images(ranked) == images(one)  # same names, seeds, bytes
    record = json.loads((ranked / "run.json").read_text())
    assert record["status"] == "complete" and record["world_size"] == 2
    assert record["counts"]["made"] == ROWS and record["counts"]["planned"] == ROWS
    assert sorted(i["file"] for i in record["images"]) == sorted(images(one))  # each image counted once
    assert [(r["rank"], r["status"], r["batches"], r["made"]) for r in record["ranks"]] == [
        (0, "complete", [0, 2], 4), (1, "complete", [1, 3], 4)]
    index = [json.loads(line)["file"] for line in (ranked / "index.jsonl").read_text().splitlines()]
    assert sorted(index) == sorted(images(one))
    assert (ranked / "grid.png").exists() and "missing" not in record
    assert f"[{ROWS}/{ROWS}]" in out  # rank 0 counts every rank's images
    sidecar = json.loads((ranked / "00003_3.json").read_text())
    assert sidecar["batch_size"] == 2 and sidecar["seed"] == 3


@pytest.mark.slow
def test_a_killed_rank_leaves_the_others_images_and_a_rerun_makes_exactly_the_missing(runs):
    manifest, tmp, *_ = runs
    out = tmp / "killed"
    proc = torchrun(manifest, out)
    part = out / "ranks" / "rank-1.json"
    deadline, pid = time.time() + 120, None
    while time.time() < deadline and proc.poll() is None:  # rank 1 has made its first batch: kill it
        try:
            p = json.loads(part.read_text())
        except (OSError, ValueError):
            p = {}
        if p.get("made", 0) >= 2:
            pid = p["pid"]
            break
        time.sleep(0.02)
    assert pid is not None, "rank 1 must be caught part-way"
    os.kill(pid, signal.SIGKILL)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    on_disk = images(out)
    for name in on_disk:
        Image.open(out / name).verify()
    assert len(on_disk) < ROWS and images(tmp / "single").items() >= on_disk.items()
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted", log  # rank 0 was stopped by torchrun (SIGTERM) and said so
    missing = record["missing"]
    assert sorted(missing) == sorted(set(images(tmp / "single")) - set(on_disk))
    assert "00007_7.png" in missing  # rank 1's second batch

    again = one_process(manifest, out)  # any number of ranks: here one
    assert again.returncode == 0, again.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    assert sorted(i["file"] for i in record["images"]) == sorted(missing)  # exactly the missing ones
    assert record["counts"]["made"] == len(missing) and record["previous_runs"][-1]["status"] == "interrupted"
    assert images(out) == images(tmp / "single")
    index = [json.loads(line)["file"] for line in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(index) == sorted(images(out))
