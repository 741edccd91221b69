"""Qwen-Image-Edit and Qwen-Image-Edit-2509: instruction editing; diffusers' QwenImageEditPipeline (one input
image a row) and QwenImageEditPlusPipeline (Edit-2509: 1 to 3 input images a row, a list).

The transformer is Qwen-Image's (the same QwenImageTransformer2DModel config), so the SVDQuant engine sees the
qwen-image ARCHITECTURE unchanged: Nunchaku's svdq-{int4,fp4}_r{32,128}-qwen-image-edit*.safetensors and
...-qwen-image-edit-2509*.safetensors files (Lightning variants included) are Qwen-Image files, matched to a model
by their config's shape keys (all three models share one shape: the file name decides, pipeline/inspect.py).
What differs is the call (diffusers 0.42), which Nunchaku's examples/v1/qwen-image-edit*.py make as here
(image=..., true_cfg_scale 4.0, negative_prompt " "):
- each input image is VAE-encoded at its own aspect ratio at 1024*1024 px (multiples of 32), whatever the output
  size, and its packed latents are appended to the output's as extra image tokens (img_shapes lists each);
- it also goes through the text encoder's vision tower: the processor puts its vision tokens into the prompt
  (Edit: the template's <|vision_start|><|image_pad|><|vision_end|>; Edit-Plus: "Picture i: ..." before the
  prompt, each image at 384*384 px), and those hidden states are part of the text sequence the transformer sees.
Sizes: the task's height and width are always passed, so the output is the task's size (each pipeline only floors
them to multiples of vae_scale_factor * 2 = 16, which task sizes already are). With neither set, tasks take the
FIRST input's aspect ratio at the recommended area (tasks.size_for_input); diffusers' own default (unused here)
is the first (Edit) or the LAST (Edit-Plus) image's aspect ratio at 1024*1024, in multiples of 32.
One image per call (`max_batch=1`): QwenImageEditPlusPipeline refuses more than one prompt, and
QwenImageEditPipeline given one image and several prompts fails in its processor (one <|image_pad|> per prompt,
one image), so a batch of job.batch_size images is made in that many calls.
Prompt length: neither edit pipeline cuts the prompt (no truncation when tokenizing; max_sequence_length is only
checked to be <= 1024), so no row is reported as truncated; the count (prompt_limits) is the prompt plus the
template's vision and closing tokens after the system part. (The text sequence the transformer sees also holds each
image's vision tokens, about 1369 for Edit's 1024*1024 image, 196 for each of Edit-Plus' 384*384 ones; one longer
than diffusers' 4096-position text rope table fails in the transformer rather than being cut.)
Loading: the model's processor/ is a Qwen2VLProcessor, which transformers 5 cannot make without torchvision (its
video processor), kept out of this environment; `pretrained_components` then gives from_pretrained one made from
processor/'s tokenizer and image processor (the PIL one) with no video processor.

Recommended (conf/model/qwen-image-edit.yaml, qwen-image-edit-2509.yaml, conf/sampler/edit.yaml): true_cfg_scale
4.0 with negative prompt " ", 1024x1024, max_sequence_length 512; 50 steps for Edit (its model card and Nunchaku's
example), 40 for Edit-2509 (its model card and Nunchaku's example). Lightning files: sampler=lightning-4step/8step.
"""

from __future__ import annotations

import sys
from typing import Any

from pipeline.families.base import Family, batch_inputs, calibration_image, register_family
from pipeline.families.qwen_image import ARCHITECTURE, guidance_kwargs
from pipeline.families.qwen_image.tiny import build_tiny_qwen_image, transformer_config
from pipeline.models.prompt_limits import Encoder

MAX_IMAGES = 3  # Edit-2509 is trained on 1 to 3 input images (its model card)


def uncut(pipe, max_sequence_length: int) -> int:
    """The edit pipelines encode the whole prompt (no truncation): no limit to report."""
    return sys.maxsize


ENCODERS = (
    Encoder("qwen", "Qwen2.5-VL", "tokenizer", uncut, templated=True,
            hint="the edit pipelines encode the whole prompt"),
)


def image_processor_class():
    """transformers' PIL Qwen2VLImageProcessor (5.x: Qwen2VLImageProcessorPil; 4.x: the plain class is PIL's)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:
        from transformers import Qwen2VLImageProcessor as Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil


def processor_without_video(tokenizer, image_processor):
    """A Qwen2VLProcessor with no video processor: the edit pipelines pass it images only.

    transformers (5.x) checks each sub-processor's class when a processor is made, and a video processor's base
    class is only there with torchvision, which this project keeps out: Qwen2VLProcessor(...) and its
    from_pretrained fail without it. The check is skipped for the absent video processor alone; the object is then
    a plain Qwen2VLProcessor."""
    from transformers import Qwen2VLProcessor

    class _WithoutVideo(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    processor = _WithoutVideo(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)
    processor.__class__ = Qwen2VLProcessor
    return processor


def pretrained_components(folder) -> dict[str, Any]:
    """What from_pretrained is given for a real model folder: without torchvision, the processor (its tokenizer and
    image processor from processor/, as the model ships them, and no video processor), which diffusers could not
    load; with torchvision, nothing (diffusers loads it all)."""
    from pathlib import Path

    from transformers.utils import is_torchvision_available

    sub = Path(folder) / "processor"
    if is_torchvision_available() or not sub.is_dir():
        return {}
    from transformers import AutoTokenizer

    return {"processor": processor_without_video(AutoTokenizer.from_pretrained(sub, local_files_only=True),
                                                 image_processor_class().from_pretrained(sub, local_files_only=True))}


def build_tiny_edit(spec, transformer=None):
    """A toy QwenImageEditPipeline: the tiny Qwen-Image components with a vision-capable text encoder."""
    return build_tiny_qwen_image(spec, transformer, pipeline_class="QwenImageEditPipeline")


def build_tiny_edit_plus(spec, transformer=None):
    """A toy QwenImageEditPlusPipeline (Edit-2509)."""
    return build_tiny_qwen_image(spec, transformer, pipeline_class="QwenImageEditPlusPipeline")


def edit_kwargs(pipe, batch) -> dict[str, Any]:
    """The row's input image (the batch's tasks share it)."""
    images, _ = batch_inputs(batch)
    return {"image": images[0], **guidance_kwargs(pipe, batch)}


def edit_plus_kwargs(pipe, batch) -> dict[str, Any]:
    """The row's input images, in the row's order (the prompt calls them Picture 1, 2, 3)."""
    images, _ = batch_inputs(batch)
    return {"image": list(images), **guidance_kwargs(pipe, batch)}


def edit_calibration_kwargs(pipe, height: int, width: int) -> dict[str, Any]:
    """A smooth seeded stand-in for the input image (the calibration manifest holds prompts only)."""
    return {"image": calibration_image(height, width)}


def edit_plus_calibration_kwargs(pipe, height: int, width: int) -> dict[str, Any]:
    return {"image": [calibration_image(height, width)]}


EDIT_AREA_TOKENS = 1024 * 1024 // 256  # each input's latents: 1024*1024 px at one token per 16x16 px
VISION_TOKENS = {"edit": 1369, "plus": 196}  # each input's vision tokens in the text sequence (1024^2 / 384^2 px)


def edit_tokens(task) -> int:
    """What Edit's input adds to the transformer's sequence: its latents and its vision tokens."""
    return len(task.images) * (EDIT_AREA_TOKENS + VISION_TOKENS["edit"])


def edit_plus_tokens(task) -> int:
    """What Edit-2509's inputs add: each one's latents (at 1024*1024) and vision tokens (at 384*384)."""
    return len(task.images) * (EDIT_AREA_TOKENS + VISION_TOKENS["plus"])


FAMILY = register_family(Family(
    name="qwen-image-edit", architecture=ARCHITECTURE, pipeline_class="QwenImageEditPipeline",
    build_tiny=build_tiny_edit, tiny_transformer_config=transformer_config, encoders=ENCODERS, inputs="image",
    call_kwargs=edit_kwargs, calibration_kwargs=edit_calibration_kwargs, max_batch=1, extra_tokens=edit_tokens,
    pretrained_components=pretrained_components,
    description="Qwen-Image-Edit image editing (one input image)"))

PLUS_FAMILY = register_family(Family(
    name="qwen-image-edit-plus", architecture=ARCHITECTURE, pipeline_class="QwenImageEditPlusPipeline",
    build_tiny=build_tiny_edit_plus, tiny_transformer_config=transformer_config, encoders=ENCODERS,
    inputs="images", max_images=MAX_IMAGES, call_kwargs=edit_plus_kwargs,
    calibration_kwargs=edit_plus_calibration_kwargs, max_batch=1, extra_tokens=edit_plus_tokens,
    pretrained_components=pretrained_components,
    description="Qwen-Image-Edit-2509 multi-image editing (1 to 3 input images)"))
