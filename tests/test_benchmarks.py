"""The benchmark scripts run end to end (toy sizes on CPU): their tables, JSON and target lines."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def test_gpu_benchmark_smoke_mode_writes_json_with_targets(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--smoke", "--only", "gemm", "--only", "flux",
                        "--variants", "bf16,int4_r32,int4_r32_unfused", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["smoke"] is True and len(result["gemm"]) == 2
    assert all(row["bf16_ms"] > 0 and row["layer_ms"] > 0 for row in result["gemm"])
    variants = {(row["variant"], row["mode"]) for row in result["transformers"]}
    assert variants == {("bf16", "eager"), ("int4_r32", "eager"), ("int4_r32_unfused", "eager")}
    quant = next(row for row in result["transformers"] if row["variant"] == "int4_r32")
    bf16 = next(row for row in result["transformers"] if row["variant"] == "bf16")
    assert quant["weight_bytes"] < bf16["weight_bytes"]
    names = [t["target"] for t in result["targets"]]
    assert "flux int4_r32 eager forward <= 0.75x BF16 eager" in names
    assert "flux int4_r32 weights <= 1/3.5 of BF16" in names
    assert not any("unfused" in name for name in names)  # the ablation is a table row, not a target
    assert "target: flux int4_r32 weights" in r.stdout and "Transformer forward" in r.stdout


def test_gpu_benchmark_times_our_kernels_and_merges_piecewise_runs_into_markdown(tmp_path):
    """The GEMM part through Triton's interpreter (the kernels' code path, not the reference), then --report."""
    import os

    gemm, flux = tmp_path / "gemm.json", tmp_path / "flux.json"
    env = dict(os.environ, TRITON_INTERPRET="1", SVDQ_KERNELS="triton")
    r = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--smoke", "--only", "gemm", "--out", str(gemm)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    rows = json.loads(gemm.read_text())["gemm"]
    assert all(row["kernel"] == "fp8" and row["w4a4_gemm_ms"] > 0 and row["gemm_vs_bf16"] > 0 for row in rows)
    # both choices the defaults make are timed: s_a ⊗ s_w, and weights expanded or packed (the interpreter: neither)
    assert all(row["scale_mma"] is False and row["expand_weights"] is False for row in rows)
    assert all(row["w4a4_gemm_other_scale_ms"] > 0 and row["w4a4_gemm_other_expand_ms"] > 0 and row["expand_ms"] > 0
               for row in rows)
    # an expanding layer (N > K, an MLP's first) is also timed into the next layer's codes, unfused and fused
    assert [("mlp_fused_ms" in row, row["N"] > row["K"]) for row in rows] == [(False, False), (True, True)]
    assert rows[1]["mlp_fused_ms"] > 0 and rows[1]["mlp_unfused_ms"] > 0
    r = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--smoke", "--only", "flux", "--variants",
                        "bf16,int4_r32", "--profile", "--out", str(flux)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    merged, md = tmp_path / "all.json", tmp_path / "all.md"
    r = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--report", str(gemm), str(flux), "--out",
                        str(merged), "--markdown", str(md)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(merged.read_text())
    assert len(result["gemm"]) == 2 and len(result["transformers"]) == 2 and result["merged_from"]
    assert {t["target"] for t in result["targets"]} >= {"flux int4_r32 eager forward <= 0.75x BF16 eager"}
    assert all(row["profile"] and sum(p["share"] for p in row["profile"]) <= 1.0 + 1e-6
               for row in result["transformers"])
    text = md.read_text()
    assert "| 48×256×128 |" in text and "## Targets (issue #4)" in text and "## Profile: flux int4_r32 eager" in text
    assert "## W4A4 GEMM variants" in text and "| FP32, packed |" in text
    assert "Timing: CPU wall clock" in text  # how the rows were timed travels through the merge
    assert "## MLP first layer into the next layer's codes (ms)" in text and "| 48×128×256 |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_gpu_benchmark_refuses_to_time_without_cuda_unless_smoke():
    r = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--only", "gemm"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "needs CUDA" in r.stderr


def test_gpu_benchmark_out_of_time_keeps_the_rows_it_measured_and_the_report_says_incomplete(tmp_path):
    """A device call has a hard time limit: past --time-budget-s the run stops, its JSON (rewritten after every
    row) holds what was measured, and a merged report marks the part incomplete."""
    out, md = tmp_path / "gemm.json", tmp_path / "all.md"
    r = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--smoke", "--only", "gemm", "--only", "flux",
                        "--time-budget-s", "0", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert len(result["gemm"]) == 1 and result["transformers"] == []
    assert result["complete"] is False and "time budget of 0 s spent" in result["stopped"]
    assert "stopped early" in r.stdout and "measured {'M': 48" in r.stdout
    r = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--report", str(out), "--out",
                        str(tmp_path / "all.json"), "--markdown", str(md)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"**Incomplete:** {out} stopped" in md.read_text()
    assert json.loads((tmp_path / "all.json").read_text())["incomplete"] == [str(out)]


def test_eager_traffic_counts_what_each_fusion_removes(tmp_path):
    """Meta-device forwards (no data) at toy sizes: the q/k kernel replaces the norm/RoPE/cat ops inside the
    attention, the fused MLP removes the GELU pass and FLUX single blocks' concatenation, the AdaLN kernel
    two of three passes per modulated norm, the gated epilogues the gate products and residual sums;
    attention stays."""
    out = tmp_path / "traffic.json"
    r = subprocess.run([sys.executable, "benchmarks/eager_traffic.py", "--tiny", "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {(row["model"], row["variant"]): row for row in json.loads(out.read_text())["rows"]}
    qk = "q/k norm + RoPE"
    for model in ("flux", "qwen-image"):
        bf16, fused, none = (rows[(model, v)] for v in ("bf16", "int4_r32", "int4_r32_unfused"))
        no_rope, no_mlp, no_norm = (rows[(model, f"int4_r32_unfused-{f}")] for f in ("rope", "mlp", "norm"))
        assert (none["gb"][qk], none["gb"]["other"]) == (bf16["gb"][qk], bf16["gb"]["other"])
        # (without the q/k kernel Qwen-Image's processor gates its outputs inside the attention module: counted there)
        assert no_rope["gb"][qk] >= bf16["gb"][qk] and fused["gb"][qk] < bf16["gb"][qk] / 3
        assert fused["launches"][qk] < no_rope["launches"][qk] / 3
        assert no_rope["gb"]["other"] >= fused["gb"]["other"]  # FLUX: diffusers' processor takes no gates
        assert no_mlp["gb"]["other"] > fused["gb"]["other"]
        assert len({row["gb"]["attention"] for row in (bf16, fused, none, no_rope, no_mlp, no_norm)}) == 1
        assert fused["gb"]["GEMM"] < bf16["gb"]["GEMM"]  # 4-bit weights
        for fusion in ("norm", "gate"):
            assert rows[(model, f"int4_r32_unfused-{fusion}")]["gb"]["other"] > fused["gb"]["other"]
    assert "q/k norm + RoPE GB" in r.stdout


def test_targets_use_the_first_measurement_of_a_variant_measured_twice_in_merged_parts():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_bench import targets

    def row(variant, ms):
        return {"model": "flux", "variant": variant, "mode": "eager", "ms_per_forward": ms, "weight_bytes": 1}

    rows = [row("bf16", 100.0), row("int4_r32", 70.0), row("int4_r32_unfused-rope", 90.0), row("int4_r32", 80.0)]
    found = {t["target"]: t["value"] for t in targets([], rows)}
    assert found == {"flux int4_r32 eager forward <= 0.75x BF16 eager": 0.7, "flux int4_r32 weights <= 1/3.5 of BF16": 1.0}


def test_device_script_parses_and_its_gpu_tests_cover_every_module_that_runs_kernels_on_a_gpu():
    """device_run.sh runs on a lent GPU only: a syntax error or a test module left off would show first there."""
    import re

    script = ROOT / "benchmarks" / "device_run.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    listed = re.search(r'GPU_TESTS="([^"]+)"', script.read_text()).group(1).split()
    assert all((ROOT / name).is_file() for name in listed), listed
    runs_on_device = re.compile(r"^(DEVICE = |from test_kernels import .*\bDEVICE\b)", re.M)
    on_gpu = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if runs_on_device.search(p.read_text())}
    assert on_gpu and on_gpu <= set(listed), on_gpu - set(listed)


def test_load_memory_benchmark_reports_sizes_and_a_measured_quantized_load(tmp_path):
    """--quick: full-size byte counts for both models (meta device) and the two loads at one block each, each in
    its own process; the verdict itself is the benchmark's business, only that there is one."""
    out = tmp_path / "load_memory.json"
    r = subprocess.run([sys.executable, "benchmarks/load_memory.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    sizes = {row["model"]: row for row in result["sizes"]}
    assert set(sizes) == {"flux.1-dev", "qwen-image"}
    for row in sizes.values():
        files = {f["label"]: f for f in row["files"]}
        assert set(files) == {"int4 r32", "int4 r128", "nvfp4 r32"}
        assert files["int4 r32"]["ratio_bf16_over_file"] > 3
        assert (files["int4 r32"]["bytes"] < files["nvfp4 r32"]["bytes"] < files["int4 r128"]["bytes"]
                < row["bf16_bytes"])
    assert result["published"]["ratio"] == 3.6 and result["published"]["ours"] > 3
    svdq = next(row for row in result["loads"] if row["kind"] == "svdq")
    assert svdq["blocks"] == [1, 1] and svdq["meta_tensors_left"] == 0 and svdq["peak_delta"] > 0
    assert svdq["file_bytes"] < svdq["full_depth_file_bytes"] and "extrapolated_full_depth" in svdq
    assert result["target"]["verdict"] in ("PASS", "FAIL") and result["target"]["limit"] == 1.3
    assert "target: quantized load peak" in r.stdout
