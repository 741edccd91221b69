"""One pipeline call and what surrounds it: the call itself (seeded per image, step callbacks chained), the
workload it is sized for, and the 16-bit reference render a quantized image is measured against (PSNR).

Nothing here knows about output folders or run.json: pipeline/runner.py decides what to make and keeps the record.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from pipeline.families import family as get_family
from pipeline.interrupt import StopSignals
from pipeline.models.memory import Workload
from pipeline.quantization.diffusers_compat import takes_argument
from pipeline.tasks import ImageTask


def psnr(a, b) -> float:
    """PSNR in dB between two 8-bit images (inf when identical), to 3 decimals as run.json records it."""
    from pipeline.quality.metrics import psnr as exact_psnr

    return round(exact_psnr(a, b), 3)


def compare_to_reference(models, family: str, batch: list[ImageTask], images, rec: dict[str, Any],
                         stop: Optional[StopSignals] = None) -> list[float]:
    """Render the same batch with the 16-bit transformer (same seeds) and measure PSNR against it. The 16-bit
    transformer waits in host memory; the quantized one leaves the device while it renders (never both there)."""
    from pipeline.models.placement import swapped_transformer

    with swapped_transformer(models.pipe, models.reference, models.placement, models.device) as where:
        rec.setdefault("reference_placement", where.to_dict())
        reference = generate_batch(models.pipe, family, batch, on_step=stop.step_end if stop else None)
    return [psnr(a, b) for a, b in zip(images, reference)]


def largest_call(pending: list[ImageTask], batch_size: int, dtype_bytes: int, family: Optional[str] = None) -> Workload:
    """The biggest pipeline call the run will make: what device memory is estimated for (a family's max_batch caps
    the images per call; its extra_tokens count what input images add to the sequence)."""
    fam = get_family(family) if family else None
    images = min(batch_size, max(1, len(pending)), (fam.max_batch if fam else None) or batch_size)
    extra = max((fam.extra_tokens(t) for t in pending), default=0) if fam else 0
    return Workload(images, max((t.height for t in pending), default=16), max((t.width for t in pending), default=16),
                    max((t.max_sequence_length for t in pending), default=1), dtype_bytes, extra)


StepEnd = Callable[[Any, int, Any, dict], Optional[dict]]  # a diffusers callback_on_step_end


def chain_step_callbacks(callbacks: StepEnd | Sequence[StepEnd | None] | None) -> Optional[StepEnd]:
    """One diffusers `callback_on_step_end` calling each of `callbacks` in turn (each may update the callback
    kwargs it is given; returning None keeps them), or None when there are none."""
    if callbacks is None or callable(callbacks):
        return callbacks
    calls = [c for c in map(chain_step_callbacks, callbacks) if c is not None]  # lists may nest
    if len(calls) <= 1:
        return calls[0] if calls else None

    def chained(pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        for c in calls:
            out = c(pipe, step_index, timestep, callback_kwargs)
            callback_kwargs = callback_kwargs if out is None else out
        return callback_kwargs

    return chained


def generate_batch(pipe, family: str, batch: list[ImageTask], on_step: StepEnd | Sequence[StepEnd | None] | None = None):
    """One pipeline call for tasks sharing a batch key; each image has its own seeded generator.

    `on_step`: diffusers `callback_on_step_end` callable(s) `(pipe, step_index, timestep, callback_kwargs)`, run
    after every denoising step (the stop check raises there; a progress callback can go beside it). A family with
    a `max_batch` gets calls of at most that many images, one after the other (their images in batch order)."""
    most = get_family(family).max_batch
    if most is not None and len(batch) > most:  # e.g. QwenImageEditPlusPipeline takes one prompt per call
        return [image for start in range(0, len(batch), most)
                for image in generate_batch(pipe, family, batch[start : start + most], on_step)]
    t = batch[0]
    kwargs: dict[str, Any] = dict(
        prompt=[x.prompt for x in batch],
        num_inference_steps=t.steps,
        height=t.height,
        width=t.width,
        max_sequence_length=t.max_sequence_length,
        true_cfg_scale=t.true_cfg_scale,
        # CPU generators: the same latents whatever the device, so CPU and GPU runs compare.
        generator=[torch.Generator("cpu").manual_seed(x.seed) for x in batch],
        output_type="pil",
    )
    if not takes_argument(pipe, "true_cfg_scale"):  # no true CFG at all (FluxFillPipeline)
        if t.true_cfg_scale > 1:
            raise ValueError(f"{type(pipe).__name__} has no true classifier-free guidance (no true_cfg_scale, no "
                             f"negative prompt): set true_cfg_scale to 1, got {t.true_cfg_scale}")
        del kwargs["true_cfg_scale"]
    elif t.true_cfg_scale > 1:
        kwargs["negative_prompt"] = [x.negative_prompt or " " for x in batch]
    kwargs.update(get_family(family).call_kwargs(pipe, batch))  # guidance, input images: the family's own
    callback = chain_step_callbacks(on_step)
    if callback is not None:
        kwargs["callback_on_step_end"] = callback
    with torch.inference_mode():
        return pipe(**kwargs).images
