"""Shared helpers: compose configs through Hydra's compose API and run jobs in-process or as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
