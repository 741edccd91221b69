"""The quality report (pipeline/report): variants found, images matched by (id, seed), metrics, plots, the page."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_config

from pipeline.report import build_report
from pipeline.report.__main__ import main as report_main
from pipeline.report.__main__ import parse_config

FAST = ["job.limit=2", "sampler.steps=2", "job.progress=none"]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep-like folder: a 16-bit job and an int4 r32 job (two images each), plus a copy of the int4 job where
    one image's sidecar says other steps (a mismatch); the report written once over it."""
    from pipeline.runner import run_job

    root = tmp_path_factory.mktemp("sweep")
    for i, q in enumerate(["none", "int4_r32"]):
        run_job(run_config([f"quantization={q}", *FAST]), root / f"{i}_quantization={q}", [f"quantization={q}"])
    bad = root / "2_quantization=int4_r32,sampler.steps=3"
    shutil.copytree(root / "1_quantization=int4_r32", bad)
    side = bad / "cat_0.json"
    d = json.loads(side.read_text())
    side.write_text(json.dumps({**d, "steps": 3}))
    build_report(root, parse_config(["report.thumbnail=64", "report.worst_k=1"]))
    return root


def test_metrics_files(sweep):
    out = sweep / "report"
    data = json.loads((out / "metrics.json").read_text())
    assert data["reference"]["name"] == "0_quantization=none" and not data["reference"]["quantized"]
    names = [v["name"] for v in data["variants"]]
    assert names == ["1_quantization=int4_r32", "2_quantization=int4_r32,sampler.steps=3"]
    v = data["variants"][0]
    assert v["precision"] == "int4" and v["rank"] == 32 and v["pairs"] == 2
    assert 20 < v["metrics"]["psnr"]["mean"] < 100 and v["metrics"]["psnr"]["min"] <= v["metrics"]["psnr"]["mean"]
    assert 0 < v["weight_ratio"] < 0.5 and v["latency_s"] > 0 and v["peak_mem_bytes"] > 0
    assert data["variants"][1]["pairs"] == 1
    assert [(m["variant"], m["id"]) for m in data["mismatches"]] == [(names[1], "cat")]
    assert "steps: 2 vs 3" in data["mismatches"][0]["reason"]
    assert len(data["pairs"]) == 3 and all("psnr" in p["metrics"] for p in data["pairs"])
    assert isinstance(data["skipped"], dict)
    for p in data["pairs"]:  # relative links that resolve from report/
        for k in ("image", "thumb", "diff", "ref_image", "ref_thumb"):
            assert not Path(p[k]).is_absolute() and (out / p[k]).is_file(), (k, p[k])
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["level"] for r in rows] == ["variant", "variant", "pair", "pair", "pair"]
    assert float(rows[0]["psnr_mean"]) == pytest.approx(v["metrics"]["psnr"]["mean"])


def test_plots_and_page(sweep):
    out = sweep / "report"
    for name in ("psnr_vs_rank", "latency", "peak_memory", "weight_bytes", "quality_vs_speed"):
        for ext in ("png", "svg"):
            assert (out / "plots" / f"{name}.{ext}").stat().st_size > 1000, name
    from PIL import Image

    with Image.open(out / "thumbs" / "1_quantization=int4_r32" / "cat_0.diff.png") as im:
        assert max(im.size) == 64
    page = (out / "index.html").read_text()
    assert "<table id='variants'>" in page
    assert not any(f"{a}='{s}" in page for a in ("src", "href") for s in ("http", "//", "/"))  # offline, relative
    assert "steps: 2 vs 3" in page and "among the worst 1" in page
    assert page.count("class='diff'") == 3


def test_cli_reference_and_errors(sweep, tmp_path, capsys):
    single = tmp_path / "single"
    shutil.copytree(sweep / "1_quantization=int4_r32", single)
    assert report_main([str(single), "--reference", str(sweep / "0_quantization=none"), "report.thumbnail=32"]) == 0
    data = json.loads((single / "report" / "metrics.json").read_text())
    assert data["variants"][0]["pairs"] == 2 and not data["mismatches"]
    assert "../" in data["pairs"][0]["ref_image"]
    assert report_main([str(single)]) == 2  # no 16-bit run and no reference
    assert "--reference" in capsys.readouterr().err
    assert report_main([str(single), "report.worst_k=0"]) == 2
    assert report_main([str(single), "report.wrost_k=3"]) == 2


def test_experiment_preset_composes():
    from conftest import compose

    from pipeline.config.validate import unknown_override_keys

    cfg = compose(["+experiment=quality"])
    assert cfg.report.enabled is True
    assert unknown_override_keys(["+experiment=quality"]) == []


def test_sweep_end_writes_report(sweep, tmp_path):
    from omegaconf import OmegaConf

    from pipeline.sweep import write_report

    target = tmp_path / "sw"
    shutil.copytree(sweep, target, ignore=shutil.ignore_patterns("report", "2_*"))
    write_report(OmegaConf.create({"report": {"enabled": False}}), target)
    assert not (target / "report").exists()
    from conftest import compose

    write_report(compose(["+experiment=quality", "report.thumbnail=32"]), target)
    assert (target / "report" / "index.html").is_file()


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_page_renders_in_chromium(sweep, tmp_path):
    page = (sweep / "report" / "index.html").as_uri()
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                          page], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-ok="1"' in dom.stdout, dom.stdout[:500]  # every <img> loaded, the table has rows
    assert "<tr>" in dom.stdout
    assert "Uncaught" not in dom.stderr, dom.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,2000", page], capture_output=True,
                   timeout=60)
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # not blank
