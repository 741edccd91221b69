"""FLUX.1 (dev, schnell): FluxPipeline, CLIP + T5 text encoders, FluxTransformer2DModel.

Here: the architecture the SVDQuant engine sees (targets and file conventions: files.py; fused forwards:
fused.py), the family the runner sees (pipeline class, tiny builder: tiny.py, text encoders, call arguments).
FLUX.1 Kontext and Fill (flux_kontext.py, flux_fill.py) share this architecture.
"""

from __future__ import annotations

from pipeline.families.base import Family, register_family
from pipeline.families.flux import files
from pipeline.families.flux.tiny import build_tiny_flux, transformer_config
from pipeline.models.prompt_limits import Encoder, clip_limit, sequence_limit
from pipeline.quantization.architecture import Architecture, register_architecture


def _fusions():
    from pipeline.families.flux.fused import fusions

    return fusions()


ARCHITECTURE = register_architecture(Architecture(
    name="flux", transformer_class="FluxTransformer2DModel", targets=files.flux_targets,
    model_class=files.MODEL_CLASS, model_classes=files.MODEL_CLASSES, owns_keys=files.owns_keys,
    block_stacks=files.BLOCK_STACKS, naming="legacy", legacy_names=files.LEGACY_NAMES,
    comfy_config=files.comfy_config, unfolded_diffusers_files=True, fusions=_fusions,
    engine_class="NunchakuFluxTransformer2dModel",
    checked_against="Nunchaku's FLUX loader and DeepCompressor's writer (legacy names, bit-exact packing)"))

ENCODERS = (
    Encoder("clip", "CLIP", "tokenizer", clip_limit,
            hint="CLIP's limit is fixed; the T5 encoder still reads up to sampler.max_sequence_length tokens"),
    Encoder("t5", "T5", "tokenizer_2", sequence_limit,
            hint="raise sampler.max_sequence_length (FLUX allows up to 512) or shorten the prompt"),
)


def guidance_kwargs(pipe, batch) -> dict:
    """FLUX.1 takes its distilled guidance (`guidance_scale`) on every call."""
    return {"guidance_scale": batch[0].guidance}


FAMILY = register_family(Family(
    name="flux", architecture=ARCHITECTURE, pipeline_class="FluxPipeline", build_tiny=build_tiny_flux,
    tiny_transformer_config=transformer_config, encoders=ENCODERS, call_kwargs=guidance_kwargs,
    description="FLUX.1 text-to-image (dev, schnell)"))
