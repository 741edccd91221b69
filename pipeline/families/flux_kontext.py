"""FLUX.1 Kontext (dev): instruction editing of one input image; diffusers' FluxKontextPipeline.

The transformer is FLUX.1's (the same FluxTransformer2DModel config as FLUX.1-dev: 64 input channels), so the
SVDQuant engine sees the flux ARCHITECTURE unchanged and Nunchaku's svdq-{int4,fp4}_r32-flux.1-kontext-dev files
are FLUX files (legacy names). What differs is the call: the input image is VAE-encoded and its packed latents are
appended to the output's as extra tokens (rope ids with first axis 1), so a step sees twice the image tokens.

Sizes. The output is always the task's height x width (the row's, else the sampler's, else the input's aspect
ratio at the model's recommended area: tasks.size_for_input). diffusers' defaults would change both sizes: it
rescales the output to `max_area` (1024*1024) whatever height/width say, and `_auto_resize` snaps the input to the
PREFERRED_KONTEXT_RESOLUTIONS entry (about 1 MP) nearest its aspect ratio. Here `max_area` is the task's own area
(so the output keeps its size) and `_auto_resize` is off: the input is resized (Lanczos, as diffusers resizes) to
its own aspect ratio at the output's area, rounded to multiples of 16. A real run at the default size thus gets
what Nunchaku's Kontext demo gets (app/flux.1/kontext passes the input's size, which diffusers turns into the
input's aspect ratio at 1 MP) with the input at that same size, which is the preferred resolution diffusers would
pick whenever the input has a preferred aspect ratio (1024x1024 for a square input, 1248x832 for a 3:2 one). At
another output size the input follows the output's area: a 512x512 edit does not pay for 4096 tokens of 1 MP
context, and the tiny models never run at 1024 px. Each step sees the output's tokens plus about as many input
tokens (the memory estimate counts both: input_tokens).

Recommended (conf/model/flux.1-kontext-dev.yaml, conf/sampler/kontext.yaml): guidance 2.5 (Nunchaku's example and
diffusers' docs), 28 steps, max_sequence_length 512.
"""

from __future__ import annotations

from typing import Any

from pipeline.families.base import Family, batch_inputs, calibration_image, register_family
from pipeline.families.flux import ARCHITECTURE, ENCODERS
from pipeline.families.flux.tiny import build_tiny_flux, transformer_config


def build_tiny_kontext(spec, transformer=None):
    """A toy FluxKontextPipeline: the tiny FLUX.1 components (the Kontext transformer is FLUX.1's)."""
    return build_tiny_flux(spec, transformer, pipeline_class="FluxKontextPipeline")


def conditioning_image(image, height: int, width: int):
    """The input image as the transformer sees it: its own aspect ratio at the output's area (multiples of 16)."""
    from PIL import Image

    from pipeline.tasks import size_for_input

    h, w = size_for_input(image.width, image.height, height * width)
    return image if image.size == (w, h) else image.resize((w, h), Image.Resampling.LANCZOS)


def sizing_kwargs(image, height: int, width: int) -> dict[str, Any]:
    """The input, resized here, and the arguments that keep diffusers from resizing it or the output again."""
    return {"image": conditioning_image(image, height, width), "max_area": height * width, "_auto_resize": False}


def kontext_kwargs(pipe, batch) -> dict[str, Any]:
    """The row's input image (one for the whole batch: its tasks share it) and the distilled guidance."""
    images, _ = batch_inputs(batch)
    t = batch[0]
    return {**sizing_kwargs(images[0], t.height, t.width), "guidance_scale": t.guidance}


def input_tokens(task) -> int:
    """The input's latent tokens, appended to the output's: the input is resized to the output's area."""
    return (task.height // 16) * (task.width // 16)


def kontext_calibration_kwargs(pipe, height: int, width: int) -> dict[str, Any]:
    """A smooth seeded stand-in for the input image (the calibration manifest holds prompts only)."""
    return sizing_kwargs(calibration_image(height, width), height, width)


FAMILY = register_family(Family(
    name="flux-kontext", architecture=ARCHITECTURE, pipeline_class="FluxKontextPipeline",
    build_tiny=build_tiny_kontext, tiny_transformer_config=transformer_config, encoders=ENCODERS, inputs="image",
    call_kwargs=kontext_kwargs, calibration_kwargs=kontext_calibration_kwargs, extra_tokens=input_tokens,
    description="FLUX.1 Kontext image editing (one input image)"))
