"""Z-Image (Turbo): ZImagePipeline, a Qwen3 text encoder, ZImageTransformer2DModel (single-stream).

Here: the architecture the SVDQuant engine sees (targets under the names Nunchaku's Z-Image files use: files.py;
fused q/k/v: fused.py), the family the runner sees (pipeline class, tiny builder: tiny.py, text encoder, call
arguments).

Prompts (diffusers 0.42, `ZImagePipeline._encode_prompt`): each prompt is wrapped in the tokenizer's chat template
(a user turn, then the assistant's opening), tokenized, padded and cut to `max_sequence_length` tokens; the text
encoder's second-to-last hidden states of the kept tokens are the caption. The cut drops the template's closing
tokens first, then the prompt's end, so the prompt itself keeps max_sequence_length minus the template's tokens
(chat_limit). `guidance_scale` is classifier-free guidance (a negative-prompt pass when > 0); Z-Image-Turbo is
distilled to run without it (guidance 0), and calibration always runs without it.
"""

from __future__ import annotations

from pipeline.families.base import Family, register_family
from pipeline.families.z_image import files
from pipeline.families.z_image.tiny import build_tiny_z_image, transformer_config
from pipeline.models.prompt_limits import Encoder
from pipeline.quantization.architecture import Architecture, register_architecture


def _fusions():
    from pipeline.families.z_image.fused import fusions

    return fusions()


ARCHITECTURE = register_architecture(Architecture(
    name="z-image", transformer_class="ZImageTransformer2DModel", targets=files.z_image_targets,
    model_class=files.MODEL_CLASS, owns_keys=files.owns_keys, block_stacks=files.BLOCK_STACKS, fusions=_fusions,
    zero_bias=False, engine_class="NunchakuZImageTransformer2DModel",
    checked_against="Nunchaku's Z-Image loader (transformer_zimage.py: to_qkv, SwiGLU net.0.proj = [w3; w1], "
                    "16-bit adaLN_modulation, bias-less layers)"))


def template_tokens(tokenizer) -> int:
    """The tokens ZImagePipeline's chat template adds around a prompt (counted on an empty prompt, as the pipeline
    tokenizes: Qwen's pre-tokenizer splits at the template's newlines and special tokens)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True,
                                         enable_thinking=True)
    return len(tokenizer(text, verbose=False).input_ids)


def chat_limit(pipe, max_sequence_length: int) -> int:
    """The prompt tokens ZImagePipeline keeps: max_sequence_length less the chat template's own tokens."""
    return max(0, max_sequence_length - template_tokens(pipe.tokenizer))


ENCODERS = (
    Encoder("qwen3", "Qwen3", "tokenizer", chat_limit,
            hint="raise sampler.max_sequence_length (Z-Image-Turbo's position table takes captions of up to 1504 "
                 "tokens) or shorten the prompt"),
)


def guidance_kwargs(pipe, batch) -> dict:
    """`guidance_scale` on every call (ZImagePipeline's default is 5.0, i.e. CFG on); with CFG, the negative
    prompts (the pipeline's default is an empty one)."""
    guidance = batch[0].guidance
    kwargs = {"guidance_scale": guidance}
    if guidance > 0:
        kwargs["negative_prompt"] = [t.negative_prompt or "" for t in batch]
    return kwargs


def no_guidance(pipe, height: int, width: int) -> dict:
    """Calibration runs without CFG (one transformer call per step)."""
    return {"guidance_scale": 0.0}


FAMILY = register_family(Family(
    name="z-image", architecture=ARCHITECTURE, pipeline_class="ZImagePipeline", build_tiny=build_tiny_z_image,
    tiny_transformer_config=transformer_config, encoders=ENCODERS, inputs="text", call_kwargs=guidance_kwargs,
    calibration_kwargs=no_guidance, description="Z-Image text-to-image (Turbo)"))
