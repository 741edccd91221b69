"""Expand manifest rows into image tasks: effective settings, deterministic seeds, settings hash.

Seeds: an image's seed is the row's `seed` if given, else `sampler.seed + row index`
(`seed_policy=index`, the default) or `sampler.seed` (`seed_policy=fixed`); a row with
`num_images: n` uses seed, seed+1, ..., seed+n-1. The same row gets the same seed in a rerun or a
sweep. The settings hash covers everything that changes the pixels, so resume can tell a finished
image from one made with other settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from pipeline.config.schema import ModelConfig, ModelSource, RunConfig, SeedPolicy
from pipeline.manifest import PromptRow
from pipeline.quantization.plan import QuantPlan


@dataclass(frozen=True)
class ImageTask:
    row: PromptRow
    number: int  # 0..num_images-1 within the row
    seed: int
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    true_cfg_scale: float
    height: int
    width: int
    max_sequence_length: int
    settings_hash: str

    @property
    def stem(self) -> str:
        return f"{self.row.id}_{self.seed}"

    @property
    def batch_key(self) -> tuple:
        """Images with equal keys can share one pipeline call."""
        return (self.steps, self.guidance, self.true_cfg_scale, self.height, self.width, self.max_sequence_length)

    def params(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "true_cfg_scale": self.true_cfg_scale,
            "height": self.height,
            "width": self.width,
            "max_sequence_length": self.max_sequence_length,
        }


def model_identity(model: ModelConfig) -> dict[str, Any]:
    """What identifies the weights: for tiny models their architecture and seed, else the path."""
    ident: dict[str, Any] = {"name": model.name, "family": model.family, "source": model.source.value}
    if model.source == ModelSource.tiny:
        from omegaconf import OmegaConf

        ident["tiny"] = OmegaConf.to_container(OmegaConf.structured(model.tiny))
    else:
        ident["path"] = model.path or model.hf_id
        ident["revision"] = model.revision
    return ident


def run_identity(cfg: RunConfig, plan: QuantPlan, dtype: str) -> dict[str, Any]:
    """The run-wide part of every image's settings hash."""
    s = cfg.sampler.scheduler
    quant = {k: getattr(plan, k) for k in ("enabled", "precision", "rank", "act_unsigned", "path")}
    if plan.enabled and not plan.path:  # quantized in-process: the calibration shapes the weights
        from dataclasses import asdict

        quant["calibration"] = asdict(cfg.quantization.calibration)
    return {
        "model": model_identity(cfg.model),
        "quantization": quant,
        "scheduler": {"name": s.name.value, "shift": s.shift, "use_dynamic_shifting": s.use_dynamic_shifting},
        "dtype": dtype,
        "vae_tiling": cfg.model.vae_tiling,  # tiles are decoded apart and blended: other pixels
    }


def _first(*values):
    return next(v for v in values if v is not None)


def expand(rows: Iterable[PromptRow], cfg: RunConfig, identity: dict[str, Any]) -> Iterator[ImageTask]:
    s, rec = cfg.sampler, cfg.model.recommended
    base = json.dumps(identity, sort_keys=True)
    for row in rows:
        if row.seed is not None:
            first_seed = row.seed
        elif s.seed_policy == SeedPolicy.index:
            first_seed = s.seed + row.index
        else:
            first_seed = s.seed
        for k in range(row.num_images):
            settings = dict(
                prompt=row.prompt,
                negative_prompt=_first(row.negative_prompt, s.negative_prompt),
                seed=first_seed + k,
                steps=_first(row.steps, s.steps, rec.steps),
                guidance=_first(row.guidance, s.guidance, rec.guidance),
                true_cfg_scale=_first(row.true_cfg_scale, s.true_cfg_scale, rec.true_cfg_scale),
                height=_first(row.height, s.height, rec.height),
                width=_first(row.width, s.width, rec.width),
                max_sequence_length=_first(s.max_sequence_length, rec.max_sequence_length),
            )
            digest = hashlib.sha256((base + json.dumps(settings, sort_keys=True)).encode()).hexdigest()[:16]
            yield ImageTask(row=row, number=k, settings_hash=digest, **settings)


def batches(tasks: list[ImageTask], batch_size: int) -> Iterator[list[ImageTask]]:
    """Group tasks with equal settings, in manifest order of first appearance, into batches."""
    groups: dict[tuple, list[ImageTask]] = {}
    for t in tasks:
        groups.setdefault(t.batch_key, []).append(t)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]
