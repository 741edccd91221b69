"""Qwen-Image: QwenImagePipeline, a Qwen2.5-VL text encoder, QwenImageTransformer2DModel.

Here: the architecture the SVDQuant engine sees (targets under the names Nunchaku's Qwen-Image files use:
files.py; fused forwards: fused.py), the family the runner sees (pipeline class, tiny builder: tiny.py, text
encoder, call arguments).
"""

from __future__ import annotations

from pipeline.families.base import Family, register_family
from pipeline.families.qwen_image import files
from pipeline.families.qwen_image.tiny import build_tiny_qwen_image, transformer_config
from pipeline.models.prompt_limits import Encoder, templated_limit
from pipeline.quantization.architecture import Architecture, register_architecture


def _fusions():
    from pipeline.families.qwen_image.fused import fusions

    return fusions()


ARCHITECTURE = register_architecture(Architecture(
    name="qwen-image", transformer_class="QwenImageTransformer2DModel", targets=files.qwen_image_targets,
    model_class=files.MODEL_CLASS, owns_keys=files.owns_keys, block_stacks=files.BLOCK_STACKS, fusions=_fusions,
    engine_class="NunchakuQwenImageTransformer2DModel",
    checked_against="Nunchaku's Qwen-Image loader (transformer_qwenimage.py: module paths, AWQ img_mod/txt_mod)"))

ENCODERS = (
    Encoder("qwen", "Qwen2.5-VL", "tokenizer", templated_limit, templated=True,
            hint="raise sampler.max_sequence_length (Qwen-Image allows up to 1024) or shorten the prompt"),
)


def guidance_kwargs(pipe, batch) -> dict:
    """Qwen-Image takes `guidance_scale` only where its transformer embeds guidance (guidance-distilled models)."""
    return {"guidance_scale": batch[0].guidance} if pipe.transformer.config.get("guidance_embeds") else {}


FAMILY = register_family(Family(
    name="qwen-image", architecture=ARCHITECTURE, pipeline_class="QwenImagePipeline",
    build_tiny=build_tiny_qwen_image, tiny_transformer_config=transformer_config, encoders=ENCODERS,
    call_kwargs=guidance_kwargs, description="Qwen-Image text-to-image"))
