"""FLUX.1 Fill (dev): inpainting, an input image and a mask per row; diffusers' FluxFillPipeline.

The transformer is FLUX.1's architecture (the flux ARCHITECTURE: same blocks, same SVDQuant targets, Nunchaku's
svdq-{int4,fp4}_r32-flux.1-fill-dev files use the FLUX legacy names) with a wider input projection: every image
token concatenates, along channels (FluxFillPipeline.__call__: torch.cat((latents, masked_image_latents), dim=2)),
  the noisy latents              latent_channels * 2*2        = 16 * 4 =  64
  the masked image's latents     latent_channels * 2*2        = 16 * 4 =  64
  the mask, at latent resolution vae_scale_factor**2 * 2*2    = 64 * 4 = 256 (each 8x8 pixel patch, 2x2 packed)
so in_channels = 384, and the transformer predicts the 64 packed latent channels: out_channels = 64. The tiny VAE
has FLUX.1's 16 latent channels and 8x downsampling, so the tiny transformer has the same 384 -> 64.

The image and the mask are resized by diffusers to the task's height x width (the row's, else the sampler's, else
the input's aspect ratio at the recommended area); the mask is binarised (white: repaint, black: keep).
FluxFillPipeline has no true classifier-free guidance (no `true_cfg_scale`, no negative prompt): guidance is the
distilled `guidance_scale`, 30 (diffusers' default, Nunchaku's example) with 50 steps (conf/sampler/fill.yaml).
"""

from __future__ import annotations

from typing import Any

from pipeline.families.base import Family, batch_inputs, calibration_image, register_family
from pipeline.families.flux import ARCHITECTURE, ENCODERS
from pipeline.families.flux.tiny import build_tiny_flux
from pipeline.families.flux.tiny import transformer_config as flux_transformer_config

LATENT_CHANNELS = 16  # FLUX.1's VAE (and the tiny one)
VAE_SCALE_FACTOR = 8  # FLUX.1's VAE downsamples by 8 (the tiny one too)
PACKED_LATENTS = LATENT_CHANNELS * 4  # 2x2 packing: 64
IN_CHANNELS = 2 * PACKED_LATENTS + VAE_SCALE_FACTOR**2 * 4  # 64 + 64 + 256 = 384
OUT_CHANNELS = PACKED_LATENTS  # 64


def transformer_config(spec) -> dict:
    """The tiny Fill transformer's config: FLUX.1's at toy size, 384 channels in, 64 out."""
    return flux_transformer_config(spec, in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS)


def build_tiny_fill(spec, transformer=None):
    """A toy FluxFillPipeline: the tiny FLUX.1 components with the wider Fill transformer."""
    return build_tiny_flux(spec, transformer, pipeline_class="FluxFillPipeline", config=transformer_config(spec))


def fill_kwargs(pipe, batch) -> dict[str, Any]:
    """The row's image and mask (one pair for the whole batch: its tasks share them) and the distilled guidance."""
    images, mask = batch_inputs(batch)
    return {"image": images[0], "mask_image": mask, "guidance_scale": batch[0].guidance}


def calibration_mask(height: int, width: int):
    """A stand-in mask: smooth random blobs, binarised by the pipeline (some tokens repainted, some kept)."""
    return calibration_image(height, width, seed=1, mode="L")


def fill_calibration_kwargs(pipe, height: int, width: int) -> dict[str, Any]:
    """A seeded stand-in image and mask (the calibration manifest holds prompts only)."""
    return {"image": calibration_image(height, width), "mask_image": calibration_mask(height, width)}


FAMILY = register_family(Family(
    name="flux-fill", architecture=ARCHITECTURE, pipeline_class="FluxFillPipeline", build_tiny=build_tiny_fill,
    tiny_transformer_config=transformer_config, encoders=ENCODERS, inputs="image+mask", call_kwargs=fill_kwargs,
    calibration_kwargs=fill_calibration_kwargs, description="FLUX.1 Fill inpainting (an input image and a mask)"))
