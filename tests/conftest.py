"""Shared helpers: compose configs through Hydra's compose API and run jobs in-process or as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core (pytest-xdist): one CPU thread
    os.environ["OMP_NUM_THREADS"] = "1"  # each, here and in the runs tests start (same threads, same bytes)
import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run in its interpreter: must be set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pipeline.cli  # noqa: E402,F401  (registers the schema and the slug resolver)
from pipeline.cli import CONF_DIR  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def compose(overrides: list[str] | None = None):
    """The DictConfig `python -m pipeline <overrides>` would get."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [])


def run_config(overrides: list[str] | None = None):
    from pipeline.config import to_run_config

    return to_run_config(compose(overrides))


def run_cli(args: list[str], cwd: Path = ROOT, timeout: int = 300, env: dict | None = None,
            module: str = "pipeline"):
    """Run `python -m pipeline ARGS` (or another entry module) as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env=full_env,
    )


@pytest.fixture
def write_manifest(tmp_path):
    def _write(name: str, text: str) -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return _write


def kernels_then_reference(monkeypatch, transformer, model: str, module, name: str, when=None):
    """A quantized tiny transformer's output with the Triton kernels (the interpreter on CPU), then with the
    reference, counting the calls of `module.name` during the kernel run (those whose bound arguments satisfy
    `when`, if given): (kernels, reference, calls)."""
    import inspect

    from test_checkpoint import transformer_inputs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    calls = []
    real = getattr(module, name)
    signature = inspect.signature(real)

    def counted(*a, **k):
        if when is None or when(signature.bind(*a, **k).arguments):
            calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, name, counted)
    if device.type == "cpu":
        monkeypatch.setenv("SVDQ_KERNELS", "triton")
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in transformer_inputs(model).items()}
    with torch.no_grad():
        out = transformer.to(device)(**kw).sample
        monkeypatch.setattr(module, name, real)
        monkeypatch.setenv("SVDQ_KERNELS", "reference")
        ref = transformer(**kw).sample
    monkeypatch.delenv("SVDQ_KERNELS")
    return out, ref, len(calls)


# One block of each kind: what a whole-transformer kernel test needs to see (the Triton interpreter's cost grows
# with every layer it runs, and these tests run the transformer four times).
ONE_BLOCK_EACH = ("model.tiny.num_layers=1", "model.tiny.num_single_layers=1")


def fusion_on_and_off(monkeypatch, model: str, fusion, module, name: str, when=None):
    """A quantized tiny transformer (one block of each kind) built with a fusion on, and one built with it off
    (`fusion.ENABLED`), each run as kernels_then_reference runs it: (the first transformer, its results, the
    second's results)."""
    from test_checkpoint import quantized_pipe

    on_model = quantized_pipe(model, "int4", *ONE_BLOCK_EACH).transformer
    on = kernels_then_reference(monkeypatch, on_model, model, module, name, when)
    monkeypatch.setattr(fusion, "ENABLED", False)
    off = kernels_then_reference(monkeypatch, quantized_pipe(model, "int4", *ONE_BLOCK_EACH).transformer, model,
                                 module, name, when)
    return on_model, on, off


def _quantized_pipe(model, precision):
    from test_checkpoint import quantized_pipe

    return quantized_pipe(model, precision)


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """(model, precision, naming) -> (quantized tiny pipe, its svdq file), each built once per test session and
    shared by every module (read-only: tests that change a model build their own)."""
    from pipeline.quantization.checkpoint import file_name, save_checkpoint

    tmp = tmp_path_factory.mktemp("ckpt")
    cache = {}

    def get(model, precision, naming="diffusers"):
        key = (model, precision, naming)
        if key not in cache:
            pipe = cache.get((model, precision, "pipe")) or _quantized_pipe(model, precision)
            cache[(model, precision, "pipe")] = pipe
            path = tmp / naming / file_name(precision, 32, model)
            path.parent.mkdir(exist_ok=True)
            save_checkpoint(pipe.transformer, path, precision=precision, rank=32, act_unsigned=True,
                            model_name=model, naming=naming)
            cache[key] = (pipe, path)
        return cache[key]

    return get
