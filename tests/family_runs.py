"""What the edit-family tests share: the quantize job's file and runs through the real runner, each made once per
test module, and the tiny input pictures their manifests point at."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from conftest import run_config


def input_pictures(folder: Path) -> np.ndarray:
    """Write a.png (a colour ramp, 64x48) and b.png (it reversed and flipped) into `folder`; returns a's pixels."""
    y, x = np.mgrid[0:48, 0:64]
    a = np.stack([x * 4, y * 5, np.full_like(x, 90)], -1).astype(np.uint8)
    Image.fromarray(a).save(folder / "a.png")
    Image.fromarray(255 - a[:, ::-1]).save(folder / "b.png")
    return a


def write_manifests(folder: Path, rows: dict[str, list[dict]]) -> dict[str, Path]:
    """variant -> folder/<variant>.jsonl holding its rows."""
    import json

    paths = {}
    for variant, got in rows.items():
        paths[variant] = folder / f"{variant}.jsonl"
        paths[variant].write_text("".join(json.dumps(r) + "\n" for r in got))
    return paths


def quantize_job_maker(tmp_path_factory, models: dict[str, str], calibration: list[str]) -> Callable:
    """variant -> (the svdq-int4_r32 file the quantize job writes for models[variant], its report), made once."""
    made = {}

    def get(variant):
        if variant not in made:
            from hydra import compose, initialize_config_dir

            from pipeline.cli import CONF_DIR
            from pipeline.config import to_run_config
            from pipeline.quantize_job import quantize_model_to_file

            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = to_run_config(compose(config_name="quantize", overrides=[
                    f"model={models[variant]}", "quantization=int4_r32", *calibration]))
            report = quantize_model_to_file(cfg, tmp_path_factory.mktemp(f"q-{variant}"))
            made[variant] = (Path(report["file"]), report)
        return made[variant]

    return get


def run_maker(tmp_path_factory, models: dict[str, str], manifests: dict[str, Path], quantize_job: Callable,
              small: list[str], calibration: list[str]) -> Callable:
    """(variant, kind) -> (run.json's dict, its folder), each run once: kind none (16-bit), int4 (quantized
    in-process, int4 r32), file (the quantize job's file)."""
    from pipeline.runner import run_job

    made = {}

    def get(variant, kind):
        if (variant, kind) not in made:
            quant = {"none": lambda: ["quantization=none"], "int4": lambda: ["quantization=int4_r32", *calibration],
                     "file": lambda: [f"quantization.path={quantize_job(variant)[0]}"]}[kind]()
            out = tmp_path_factory.mktemp(f"{variant}-{kind}")
            cfg = run_config([f"model={models[variant]}", f"job.manifest={manifests[variant]}", *small, *quant])
            made[(variant, kind)] = (run_job(cfg, out), out)
        return made[(variant, kind)]

    return get


def pixels(folder: Path, stem: str) -> np.ndarray:
    return np.asarray(Image.open(folder / f"{stem}.png"))
