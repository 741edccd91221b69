"""Collect each target layer's input statistics by running the 16-bit pipeline on calibration prompts.

Hooks see the layer inputs at every denoising step of every prompt (so all timesteps count), keep
the per-channel |max| over all tokens, and a seeded random sample of token rows for measuring the
quantized layer's output error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from pipeline.quantization.diffusers_compat import takes_argument
from pipeline.quantization.quantizer import ActStats
from pipeline.quantization.targets import Target
from pipeline.quantization.transform import get_module


@dataclass
class CalibrationSettings:
    prompts: Sequence[str]
    steps: int
    height: int
    width: int
    max_rows: int = 512
    batch_size: int = 4
    seed: int = 0
    max_sequence_length: int = 512
    call_kwargs: dict = field(default_factory=dict)  # the family's own arguments (e.g. a stand-in input image)


class _Collector:
    def __init__(self, cols, per_call: int, generator: torch.Generator):
        self.cols, self.per_call, self.gen = cols, per_call, generator
        self.absmax = None
        self.rows: list[torch.Tensor] = []

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
        if self.cols:
            x = x[:, self.cols[0] : self.cols[1]]
        m = x.abs().amax(0)
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        idx = torch.randperm(x.shape[0], generator=self.gen)[: self.per_call]
        self.rows.append(x[idx])

    def stats(self, max_rows: int) -> ActStats:
        sample = torch.cat(self.rows)
        if sample.shape[0] > max_rows:
            sample = sample[torch.randperm(sample.shape[0], generator=self.gen)[:max_rows]]
        return ActStats(self.absmax, sample)


def collect_stats(pipe, targets: list[Target], settings: CalibrationSettings) -> dict[str, ActStats]:
    """Run the pipeline on the calibration prompts with hooks on every W4A4 target's input."""
    transformer: nn.Module = pipe.transformer
    batches = math.ceil(len(settings.prompts) / settings.batch_size)
    per_call = max(8, math.ceil(settings.max_rows / max(1, batches * settings.steps)))
    collectors: dict[str, _Collector] = {}
    handles = []
    for i, t in enumerate(targets):
        c = _Collector(t.cols, per_call, torch.Generator().manual_seed(settings.seed + i))
        collectors[t.name] = c
        handles.append(get_module(transformer, t.parts[0]).register_forward_pre_hook(c))
    # true CFG off where the pipeline has it (FluxFillPipeline has none, and no such argument)
    no_true_cfg = {"true_cfg_scale": 1.0} if takes_argument(pipe, "true_cfg_scale") else {}
    try:
        for start in range(0, len(settings.prompts), settings.batch_size):
            chunk = list(settings.prompts[start : start + settings.batch_size])
            gens = [torch.Generator("cpu").manual_seed(settings.seed + start + j) for j in range(len(chunk))]
            with torch.inference_mode():
                pipe(prompt=chunk, num_inference_steps=settings.steps, height=settings.height,
                     width=settings.width, generator=gens, output_type="latent", **no_true_cfg,
                     max_sequence_length=settings.max_sequence_length, **settings.call_kwargs)
    finally:
        for h in handles:
            h.remove()
    return {name: c.stats(settings.max_rows) for name, c in collectors.items() if c.absmax is not None}
