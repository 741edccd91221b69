"""A model family: everything the pipeline needs to know about one model, in one place.

A family module (pipeline/families/<name>) builds one `Family` and registers it. Several families may share a
transformer architecture (FLUX.1-dev, Kontext and Fill are FluxTransformer2DModel): the `Architecture` is what
the SVDQuant engine sees (targets, file names, fused forwards; pipeline/quantization/architecture.py), the
`Family` what the runner sees (the diffusers pipeline, the tiny offline builder, text encoders, input images,
the call's own arguments).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from pipeline.inputs import INPUT_KINDS  # defined with the manifest's input checks

if TYPE_CHECKING:
    from pipeline.config.schema import TinySpec
    from pipeline.models.prompt_limits import Encoder
    from pipeline.quantization.architecture import Architecture
    from pipeline.tasks import ImageTask


def no_call_kwargs(pipe, batch: list["ImageTask"]) -> dict[str, Any]:
    return {}


def no_extra_tokens(task: "ImageTask") -> int:
    return 0


def no_calibration_kwargs(pipe, height: int, width: int) -> dict[str, Any]:
    return {}


def batch_inputs(batch: list["ImageTask"]) -> tuple[list[Any], Optional[Any]]:
    """The input images (PIL, RGB) and mask (PIL, L) of a batch: its tasks share them (the batch key holds their
    sha256s), so they are the first task's. Each file is read and checked against its sha256 (pipeline/inputs.py)."""
    from pipeline.inputs import load_input

    task = batch[0]
    return [load_input(i) for i in task.images], (load_input(task.mask) if task.mask is not None else None)


def calibration_image(height: int, width: int, seed: int = 0, mode: str = "RGB"):
    """A seeded smooth random picture standing in for an input image while calibrating an image family (the
    calibration manifest holds prompts only): low-frequency colour fields, like a photo's, not white noise."""
    import numpy as np
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    channels = 3 if mode == "RGB" else 1
    coarse = torch.rand(1, channels, max(2, height // 32), max(2, width // 32), generator=g)
    field = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    pixels = (field.clamp(0, 1)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


@dataclass(frozen=True)
class Family:
    """One model family, as the runner sees it.

    inputs: text (text-to-image), image (one input image per row), images (one or more), image+mask (inpainting).
    call_kwargs(pipe, batch): the pipeline-call arguments particular to the family (guidance, input images:
    batch_inputs), added to the common ones (prompts, steps, size, seeds). calibration_kwargs(pipe, height, width):
    what the calibration calls need besides prompts (an image family's stand-in input: calibration_image). build_tiny(spec, transformer): the whole pipeline at toy size,
    offline; `transformer` (one built from a file) replaces the seeded one."""

    name: str
    architecture: "Architecture"
    pipeline_class: str  # diffusers' pipeline class
    build_tiny: Callable[["TinySpec", Optional[Any]], Any]
    tiny_transformer_config: Callable[["TinySpec"], dict]
    encoders: tuple["Encoder", ...]
    inputs: str = "text"
    max_images: int = 1  # for inputs == "images": how many a row may give
    call_kwargs: Callable[[Any, list["ImageTask"]], dict[str, Any]] = no_call_kwargs
    calibration_kwargs: Callable[[Any, int, int], dict[str, Any]] = no_calibration_kwargs  # e.g. a stand-in image
    extra_tokens: Callable[["ImageTask"], int] = no_extra_tokens  # sequence tokens a task's inputs add (memory)
    max_batch: Optional[int] = None  # most images one pipeline call may make (None: job.batch_size); larger batches
    #                                  are made in calls of this many (QwenImageEditPlusPipeline takes one prompt)
    # (model folder) -> components to give from_pretrained instead of loading them (None: it loads them all)
    pretrained_components: Optional[Callable[[Any], dict[str, Any]]] = None
    description: str = ""

    @property
    def takes_images(self) -> bool:
        return self.inputs != "text"


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.inputs not in INPUT_KINDS:
        raise ValueError(f"{family.name}: inputs must be one of {INPUT_KINDS}, got {family.inputs!r}")
    _FAMILIES[family.name] = family
    return family


def registered() -> dict[str, Family]:
    return _FAMILIES
