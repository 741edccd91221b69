"""Plans against files (name vs header vs tensors vs settings), backends, and runs that load files."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from conftest import run_cli, run_config
from pipeline.config.schema import Backend
from pipeline.errors import QuantizationError
from pipeline.quantization.backend import choose_backend, nunchaku_engine
from pipeline.runner import plan_quantization, run_job


def plan_for(path, *overrides):
    return plan_quantization(run_config([f"quantization.path={path}", *overrides]))[0]


def test_file_name_header_and_tensors_agree(saved):
    _, path = saved("tiny-flux", "int4")
    p = plan_for(path)
    assert (p.precision, p.rank, p.act_unsigned, p.decided_by) == ("int4", 32, True, "filename")
    assert p.detected["tensors"] == {"precision": "int4", "rank": 32}


def test_misnamed_file_is_an_error_unless_forced(saved, tmp_path):
    _, path = saved("tiny-flux", "int4")
    wrong = tmp_path / "svdq-int4_r128-tiny-flux.safetensors"
    shutil.copy(path, wrong)
    with pytest.raises(QuantizationError) as e:
        plan_for(wrong)
    assert "the file name says rank=128 but the tensors are rank=32" in str(e.value)
    assert "quantization.force=true" in str(e.value)
    forced = plan_for(wrong, "quantization.force=true")
    assert forced.rank == 32 and any("forced:" in n for n in forced.notes)


def test_manual_settings_that_contradict_the_file(saved):
    _, path = saved("tiny-flux", "int4")
    with pytest.raises(QuantizationError, match="quantization.precision=nvfp4 is set but the file's tensors are precision=int4"):
        plan_for(path, "quantization.precision=nvfp4")
    with pytest.raises(QuantizationError, match="act_unsigned=False is set but the file was quantized with act_unsigned=True"):
        plan_for(path, "quantization.act_unsigned=false")
    assert plan_for(path, "quantization.rank=64", "quantization.force=true").rank == 32


def test_missing_weight_file_is_named():
    with pytest.raises(QuantizationError, match="quantization.path=/nowhere/svdq-int4_r32-x.safetensors: no such file"):
        plan_for("/nowhere/svdq-int4_r32-x.safetensors")


def test_run_with_a_quantization_file_reports_psnr_against_16_bit(saved, tmp_path):
    _, path = saved("tiny-flux", "int4")
    record = run_job(run_config([f"quantization.path={path}", "job.limit=2", "job.progress=none",
                                 "job.compare_to_unquantized=true"]), tmp_path / "out")
    summary = record["quantization"]["summary"]
    assert summary["source"] == "file" and summary["layers_swapped"] == 30 and summary["backend"] == "reference"
    assert summary["bytes_after"] < summary["bytes_before"]  # tiny: 16-bit embedders dominate; see the benchmark
    assert 20 < record["quality"]["psnr_vs_unquantized_mean"] < 100
    side = json.loads((tmp_path / "out/cat_0.json").read_text())
    assert side["psnr_vs_unquantized"] == record["images"][0]["psnr_vs_unquantized"]
    assert side["quantization"]["path"] == str(path)


def test_cpu_uses_the_reference_and_says_so():
    import torch

    choice = choose_backend(Backend.auto, "nvfp4", torch.device("cpu"), True, strict=True)
    assert choice.name == "reference" and "PyTorch reference on cpu" in choice.notes[0]


def test_pypi_nunchaku_is_detected_as_the_wrong_package(tmp_path, monkeypatch):
    fake = tmp_path / "nunchaku"
    fake.mkdir()
    (fake / "__init__.py").write_text('"""piecewise-linear partitioning (not the SVDQuant engine)"""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("nunchaku", None)
    try:
        usable, why = nunchaku_engine()
        assert not usable and "not the SVDQuant engine" in why and "PyPI's 'nunchaku' is an unrelated library" in why
        import torch

        with pytest.raises(QuantizationError, match="backend=nunchaku: the installed nunchaku"):
            choose_backend(Backend.nunchaku, "int4", torch.device("cpu"), True, strict=False)
        auto = choose_backend(Backend.auto, "int4", torch.device("cpu"), True, strict=False)
        assert auto.name == "reference" and any("unrelated library" in n for n in auto.notes)
    finally:
        sys.modules.pop("nunchaku", None)


def test_no_nunchaku_installed_is_reported():
    usable, why = nunchaku_engine()
    assert not usable and "no package named nunchaku" in why


def test_quantize_job_writes_a_file_the_run_loads(tmp_path):
    out = tmp_path / "q"
    r = run_cli(["model=tiny-qwen-image", "quantization=int4_r32", f"quantization.output={out}",
                 "quantization.calibration.num_prompts=2", "quantization.calibration.steps=2",
                 f"hydra.run.dir={tmp_path / 'run'}"], module="pipeline.quantize_job")
    assert r.returncode == 0, r.stderr
    path = out / "svdq-int4_r32-tiny-qwen-image.safetensors"
    report = json.loads((out / "svdq-int4_r32-tiny-qwen-image-report.json").read_text())
    assert report["file"] == str(path) and report["rank"] == 32 and len(report["layers"]) == 20
    assert report["calibration"]["num_prompts"] == 2 and 0 < report["layer_error_mean"] < 0.5
    assert report["transformer_bytes_quantized"] < report["transformer_bytes_16bit"]
    run = run_cli(["model=tiny-qwen-image", f"quantization.path={path}", "job.limit=1",
                   f"hydra.run.dir={tmp_path / 'gen'}"])
    assert run.returncode == 0, run.stderr
    rec = json.loads((tmp_path / "gen/run.json").read_text())
    assert rec["quantization"]["summary"]["source"] == "file" and rec["counts"]["made"] == 1


def test_quantize_job_user_error_exits_2(tmp_path):
    r = run_cli(["model=tiny-qwen-image", "quantization.calibration.steps=1", f"hydra.run.dir={tmp_path}"],
                module="pipeline.quantize_job")
    assert r.returncode == 2 and "quantization.calibration.steps: tiny-qwen-image needs at least 2 steps" in r.stderr


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend torch sees a GPU of a given compute capability (the policy only asks torch)."""
    import torch

    def install(cc, name):
        from pipeline.kernels import dispatch

        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
        monkeypatch.setattr(dispatch, "_CAPABILITY", {})  # the kernels' per-GPU cache
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        return torch.device("cuda")

    return install


@pytest.mark.parametrize(
    "cc,name,precision,problem",
    [((6, 1), "GTX 1080", "int4", "INT4 kernels need compute capability 7.0 or newer; GTX 1080 is 6.1"),
     ((9, 0), "H100", "nvfp4", "NVFP4 tensor cores are on Blackwell GPUs (compute capability 10.x/12.x); H100 is 9.0"),
     ((8, 9), "RTX 4090", "nvfp4", "RTX 4090 is 8.9, so NVFP4 is emulated"),
     ((9, 0), "H100", "int4", None), ((12, 0), "RTX 5090", "nvfp4", None), ((10, 0), "B200", "nvfp4", None),
     ((7, 5), "T4", "int4", None), ((8, 0), "A100", "int4", None)],
)
def test_device_policy_warns_or_fails_under_strict(fake_gpu, cc, name, precision, problem):
    from pipeline.errors import DeviceError
    from pipeline.quantization.backend import hardware_notes

    from pipeline.kernels.dispatch import describe

    device = fake_gpu(cc, name)
    notes = hardware_notes(precision, device, strict=False)
    expected = describe(device, precision)  # Triton: INT4 and NVFP4 (emulated) on sm_80+ (no INT8 dot on Turing)
    assert notes[-1] == f"{precision} layers run through the {expected} on {name}"
    assert ("Triton" in expected) == (cc >= (8, 0) and _has_triton())
    assert ("emulated" in expected) == (precision == "nvfp4" and "Triton" in expected)
    if problem:
        assert any(problem in n for n in notes)
        with pytest.raises(DeviceError, match="unset quantization.strict"):
            hardware_notes(precision, device, strict=True)
    else:
        assert len(notes) == 1 and hardware_notes(precision, device, strict=True) == notes


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def test_engine_support_matrix_matches_nunchakus(fake_gpu):
    from pipeline.quantization.backend import _engine_supports

    for cc, int4, fp4 in [((7, 5), True, False), ((8, 9), True, False), ((9, 0), False, False),
                          ((12, 0), False, True), ((6, 1), False, False)]:
        device = fake_gpu(cc, "gpu")
        assert (_engine_supports("int4", device), _engine_supports("nvfp4", device)) == (int4, fp4), cc
