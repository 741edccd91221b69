"""`svdq-batch inspect FILE...`: what a file is, from its header alone; problems exit 1, unusable files exit 2."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import safetensors
import safetensors.torch
import torch

from conftest import ROOT, run_cli, run_config
from pipeline import inspect as inspect_cli
from pipeline.models.tiny import build_tiny
from pipeline.quantization.targets import targets_for

GOOD = [("tiny-flux", "int4", "legacy"), ("tiny-qwen-image", "nvfp4", "diffusers")]


def rewrite_metadata(src, dst, **changes):
    """A copy of a safetensors file whose header metadata has `changes` (None deletes a key); tensor bytes kept."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header["__metadata__"]
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value if isinstance(value, str) else json.dumps(value)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return dst


def inspect_in_process(capsys, *args):
    """pipeline.inspect.main as the console script runs it: (exit status, stdout, stderr)."""
    status = inspect_cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


def expected_layers(model):
    targets = targets_for(build_tiny(run_config([f"model={model}"]).model).transformer)
    return sum(t.kind == "w4a4" for t in targets), sum(t.kind == "awq" for t in targets)


def values_of(human: str, label: str) -> list[str]:
    """The values of `label` rows in the human output."""
    return [line.split(None, len(label.split()))[-1] for line in human.splitlines()
            if line.startswith("  ") and line.split()[:len(label.split())] == label.split()]


@pytest.mark.parametrize("model,precision,naming", GOOD)
def test_a_good_file_is_described_from_its_header_as_json_and_text(saved, model, precision, naming):
    _, path = saved(model, precision, naming)
    w4a4, awq = expected_layers(model)
    spec = run_config([f"model={model}"]).model.tiny
    blocks = {"num_layers": spec.num_layers, **({"num_single_layers": spec.num_single_layers}
                                                if model == "tiny-flux" else {})}
    token = {"int4": "int4", "nvfp4": "fp4"}[precision]

    as_json = run_cli([str(path), "--json"], module="pipeline.inspect", timeout=120)
    assert as_json.returncode == 0, as_json.stderr
    r = json.loads(as_json.stdout)  # nothing but the JSON object on stdout
    assert (r["precision"], r["precision_token"], r["rank"], r["naming"]) == (precision, token, 32, naming)
    assert r["family"] == ("flux" if model == "tiny-flux" else "qwen-image")
    assert (r["w4a4_layers"], r["awq_layers"], r["blocks"]) == (w4a4, awq, blocks)
    assert r["bytes"] == os.path.getsize(path) and r["gib"] == pytest.approx(os.path.getsize(path) / 2 ** 30)
    assert (r["fits"], r["fits_by"], r["problems"]) == ([model], "config", [])
    said = {"precision": precision, "rank": 32}
    assert r["said_by"]["tensors"] == r["said_by"]["metadata"] == said == r["said_by"]["file_name"]
    assert r["metadata"]["config"] and r["metadata"]["quantization_config"]
    assert r["metadata"]["comfy_config"] == (model == "tiny-flux")  # Nunchaku's Qwen-Image files carry none
    assert r["run"] == [f"python -m pipeline model={model} quantization.path={path.resolve()}"]
    assert ("nunchaku" in r["naming_readers"]) and "comfyui-nunchaku" in r["naming_readers"]

    human = run_cli(["inspect", str(path)], module="pipeline.cli", timeout=120)
    assert human.returncode == 0, human.stderr
    assert human.stdout.splitlines()[0] == path.name
    shown = precision if token == precision else f"{precision} (file-name token {token})"
    assert values_of(human.stdout, "precision") == [shown]
    assert values_of(human.stdout, "rank") == ["32"]
    assert values_of(human.stdout, "naming")[0].startswith(f"{naming}: ")
    assert values_of(human.stdout, "layers") == [f"{w4a4} W4A4 (SVDQuant) + {awq} AWQ (W4A16)"]
    assert values_of(human.stdout, "size")[0].startswith(f"{os.path.getsize(path):,} bytes = ")
    assert values_of(human.stdout, "fits model") == [f"{model} (by its config metadata)"]
    assert values_of(human.stdout, "problems") == ["none"] and not values_of(human.stdout, "problem")


def test_the_console_script_runs_inspect(saved):
    _, path = saved("tiny-flux", "int4", "legacy")
    script = os.path.join(os.path.dirname(sys.executable), "svdq-batch")
    if not os.path.exists(script):
        pytest.skip("svdq-batch is not installed in this environment (pip install -e .)")
    done = subprocess.run([script, "inspect", str(path), "--json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["naming"] == "legacy"


class NoTensorData:
    """safetensors.safe_open that serves the header (keys, metadata, shapes, dtypes) and fails on tensor data."""

    opened = 0

    def __init__(self, real):
        self.real = real
        NoTensorData.opened += 1

    def __enter__(self):
        self.real.__enter__()
        return self

    def __exit__(self, *exc):
        return self.real.__exit__(*exc)

    def keys(self):
        return self.real.keys()

    def metadata(self):
        return self.real.metadata()

    def get_tensor(self, name):
        raise AssertionError(f"tensor data read: {name}")

    def get_slice(self, name):
        real = self.real.get_slice(name)

        class HeaderOnly:
            get_shape, get_dtype = real.get_shape, real.get_dtype

            def __getitem__(self, index):
                raise AssertionError(f"tensor data read: {name}[{index}]")

        return HeaderOnly()


def test_no_tensor_data_is_read(saved, monkeypatch, capsys):
    _, path = saved("tiny-qwen-image", "nvfp4")
    real_open = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: NoTensorData(real_open(*a, **k)))
    for name in ("load_file", "load"):
        monkeypatch.setattr(safetensors.torch, name, lambda *a, **k: pytest.fail("a whole file was loaded"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    NoTensorData.opened = 0
    status, out, err = inspect_in_process(capsys, path, "--json")
    assert (status, err) == (0, "")
    assert json.loads(out)["rank"] == 32
    assert NoTensorData.opened >= 1  # the header really was read through the guarded reader


@pytest.mark.parametrize("kind", ["truncated", "not safetensors", "no SVDQuant tensors", "missing"])
def test_a_file_that_is_not_a_usable_svdq_file_is_one_line_and_exit_2(saved, tmp_path, capsys, kind):
    _, good = saved("tiny-flux", "int4", "legacy")
    bad = tmp_path / "svdq-int4_r32-bad.safetensors"
    if kind == "truncated":
        bad.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    elif kind == "not safetensors":
        bad.write_text("a text file, not a safetensors one\n")
    elif kind == "no SVDQuant tensors":
        safetensors.torch.save_file({"proj_out.weight": torch.zeros(4, 4)}, str(bad), metadata={"config": "{}"})
    status, out, err = inspect_in_process(capsys, bad)
    assert (status, out) == (2, "")
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {bad}: ")
    expected = {"truncated": "not a readable safetensors file", "not safetensors": "not a readable safetensors file",
                "no SVDQuant tensors": "not a Nunchaku svdq-* file", "missing": "no such file"}[kind]
    assert expected in err
    status, out, _ = inspect_in_process(capsys, bad, "--json")
    assert status == 2 and set(json.loads(out)) == {"path", "error"} and expected in json.loads(out)["error"]


def test_a_file_renamed_to_another_precision_and_rank_is_a_problem(saved, tmp_path, capsys):
    _, good = saved("tiny-flux", "int4", "legacy")
    renamed = shutil.copy(good, tmp_path / "svdq-fp4_r128-tiny-flux.safetensors")
    status, out, _ = inspect_in_process(capsys, renamed, "--json")
    r = json.loads(out)
    assert status == 1 and not r["ok"]
    assert r["problems"] == ["the file name says precision=nvfp4 but the tensors are precision=int4",
                             "the file name says rank=128 but the tensors are rank=32"]
    assert r["said_by"]["file_name"] == {"precision": "nvfp4", "rank": 128}
    assert r["run"][0].endswith("quantization.force=true")  # a run refuses the misnamed file unless forced
    status, out, _ = inspect_in_process(capsys, renamed)
    assert status == 1 and values_of(out, "problem") == r["problems"]


def test_metadata_that_disagrees_with_the_tensors_is_a_problem(saved, tmp_path, capsys):
    from pipeline.quantization.file_info import quantization_config

    _, good = saved("tiny-qwen-image", "nvfp4")
    liar = rewrite_metadata(good, tmp_path / good.name, quantization_config=quantization_config("int4", 64))
    status, out, _ = inspect_in_process(capsys, liar, "--json")
    r = json.loads(out)
    assert status == 1
    assert r["said_by"]["metadata"] == {"precision": "int4", "rank": 64}
    assert r["said_by"]["tensors"] == r["said_by"]["file_name"] == {"precision": "nvfp4", "rank": 32}
    assert r["problems"] == ["metadata quantization_config says precision=int4 but the tensors are precision=nvfp4",
                             "metadata quantization_config says rank=64 but the tensors are rank=32"]
    assert r["run"][0].endswith("quantization.force=true")


def test_the_model_a_file_fits_comes_from_its_config_or_else_its_blocks(saved, tmp_path, capsys):
    _, good = saved("tiny-flux", "int4", "legacy")
    # named: block counts alone also fit tiny-flux-kontext and tiny-flux-fill (inspect.named_in_file picks by name)
    no_config = rewrite_metadata(good, tmp_path / "no-config-tiny-flux.safetensors", config=None)
    status, out, _ = inspect_in_process(capsys, no_config, "--json")
    r = json.loads(out)
    assert (status, r["fits"], r["fits_by"], r["metadata"]["config"]) == (0, ["tiny-flux"], "blocks", False)
    assert r["run"][0].endswith("quantization.precision=int4 quantization.rank=32")  # the name does not say them

    config = json.loads(safetensors.safe_open(str(good), "pt").metadata()["config"])
    other = rewrite_metadata(good, tmp_path / "svdq-int4_r32-other.safetensors",
                             config=dict(config, attention_head_dim=2 * config["attention_head_dim"]))
    status, out, _ = inspect_in_process(capsys, other)
    assert status == 0 and values_of(out, "fits model") == ["unknown"]
    assert "no known model fits this file" in values_of(out, "note")
    head_dim = config["attention_head_dim"]
    assert f"tiny-flux: attention_head_dim: file {2 * head_dim}, model {head_dim}" in values_of(out, "differs from")

    dev = json.loads((ROOT / "pipeline/models/configs/flux.1-dev.json").read_text())
    lightning = rewrite_metadata(good, tmp_path / "svdq-int4_r32-flux.1-dev-lightning-8steps.safetensors", config=dev)
    status, out, _ = inspect_in_process(capsys, lightning, "--json")
    r = json.loads(out)
    assert (status, r["fits"]) == (1, ["flux.1-dev"])  # config fits flux.1-dev, but this file has 2 blocks, not 19
    assert f"metadata config says num_layers={dev['num_layers']} but the file has 2 such blocks" in r["problems"]
    assert r["run"] == [f"python -m pipeline model=flux.1-dev model.path=/models/FLUX.1-dev "
                        f"quantization.path={lightning.resolve()} sampler=lightning-8step"]


def test_several_files_at_once_one_bad(saved, tmp_path):
    _, flux = saved("tiny-flux", "int4", "legacy")
    _, qwen = saved("tiny-qwen-image", "nvfp4")
    bad = tmp_path / "svdq-int4_r32-cut.safetensors"
    bad.write_bytes(flux.read_bytes()[:1000])
    done = run_cli([str(flux), str(bad), str(qwen), "--json"], module="pipeline.inspect", timeout=120)
    assert done.returncode == 2
    reports = json.loads(done.stdout)
    assert [r.get("precision") for r in reports] == ["int4", None, "nvfp4"]
    assert reports[1]["path"] == str(bad) and "not a readable safetensors file" in reports[1]["error"]
    assert done.stderr.splitlines() == [f"error: {bad}: {reports[1]['error']}"]  # one line, no traceback

    human = run_cli(["inspect", str(flux), str(qwen), str(shutil.copy(flux, tmp_path / "svdq-int4_r64-x.safetensors"))],
                    module="pipeline.cli", timeout=120)
    assert human.returncode == 1 and human.stderr == ""
    assert values_of(human.stdout, "rank") == ["32", "32", "32"]
    assert values_of(human.stdout, "problem") == ["the file name says rank=64 but the tensors are rank=32"]
