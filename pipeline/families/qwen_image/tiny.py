"""Qwen-Image at toy size, built in-process: a Qwen2.5-VL text encoder, the Qwen-Image VAE and transformer.

`build_tiny_qwen_image(spec)` is the text-to-image QwenImagePipeline (what tiny-qwen-image runs: its defaults build
exactly what they always built). With `pipeline_class` QwenImageEditPipeline or QwenImageEditPlusPipeline it is an
edit pipeline (pipeline/families/qwen_image_edit.py): the same transformer, VAE and text encoder shapes, plus what an
edit pipeline feeds its input image through, the text encoder's vision tower:
- the tokenizer gains Qwen2.5-VL's vision special tokens (<|vision_start|>, <|vision_end|>, <|vision_pad|>,
  <|image_pad|>, <|video_pad|>) at the end of its vocabulary, and the Qwen2_5_VLConfig carries their real ids
  (the text-to-image model points them past the vocabulary: it never sees an image token);
- a Qwen2VLProcessor (tokenizer + the PIL Qwen2VLImageProcessor, at TINY_VISION_PIXELS: a few vision tokens per
  image) built in-process, without a video processor (transformers' needs torchvision, which this project keeps out);
- `prompt_template_encode_start_idx` set to the number of tokens the tiny tokenizer makes of the template's system
  part (diffusers' 64 is the real tokenizer's count), so the toy drops exactly the system prompt, as the real one;
- the input image is VAE-encoded at TINY_EDIT_AREA pixels instead of diffusers' fixed 1024*1024 (QwenImageEdit
  pipelines size it from the input's aspect ratio at that area whatever the output size; at 1024*1024 a toy call
  would spend seconds in the VAE): the tiny class wraps `__call__` and scales the area diffusers' module-level
  `calculate_dimensions` is given for the duration of the call. Nothing else of the call differs.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading

from pipeline.config.schema import TinySpec
from pipeline.models.tiny import rope_axes, seeded, tokenizer

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
EDIT_PIPELINES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
TINY_EDIT_AREA = 128 * 128  # the area a tiny edit pipeline VAE-encodes its input at (diffusers: 1024 * 1024)
DIFFUSERS_EDIT_AREA = 1024 * 1024
TINY_VISION_PIXELS = (28 * 28, 56 * 56)  # the tiny image processor's min/max pixels: 1 to 4 vision tokens an image


def transformer_config(spec: TinySpec) -> dict:
    """QwenImageTransformer2DModel's config at toy size (64 = 16 latent channels packed 2x2, as in Qwen-Image)."""
    return dict(in_channels=64, num_layers=spec.num_layers, attention_head_dim=spec.attention_head_dim,
                num_attention_heads=spec.num_attention_heads, joint_attention_dim=spec.text_hidden_size,
                axes_dims_rope=rope_axes(spec.attention_head_dim), patch_size=2, out_channels=16,
                guidance_embeds=False)


def _vae(spec: TinySpec):
    from diffusers import AutoencoderKLQwenImage

    return seeded(
        spec.seed + 1,
        lambda: AutoencoderKLQwenImage(
            base_dim=16,
            z_dim=16,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * 16,
            latents_std=[1.0] * 16,
        ),
    )


def _text_encoder(spec: TinySpec, tok, vision_ids: dict[str, int] | None):
    """The tiny Qwen2.5-VL; `vision_ids` None: its image token ids point past the vocabulary (text-to-image)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text_dim = spec.text_hidden_size
    text_heads = 2
    half = text_dim // text_heads // 2  # mrope sections split the rotary half-dim in 3
    if vision_ids is None:  # ids past the vocabulary: the tiny text-to-image encoder never sees image tokens
        vision_ids = {t: len(tok) + i for i, t in enumerate(VISION_TOKENS, 1)}
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": text_dim,
            "intermediate_size": text_dim * 2,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": text_heads,
            "num_key_value_heads": text_heads,
            "vocab_size": len(tok),
            "rope_scaling": {"mrope_section": [half - 2 * (half // 3), half // 3, half // 3], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.pad_token_id,
            "eos_token_id": tok.pad_token_id,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": text_dim},
        vocab_size=len(tok),
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.pad_token_id,
        vision_start_token_id=vision_ids["<|vision_start|>"],
        vision_end_token_id=vision_ids["<|vision_end|>"],
        vision_token_id=vision_ids["<|vision_pad|>"],
        image_token_id=vision_ids["<|image_pad|>"],
        video_token_id=vision_ids["<|video_pad|>"],
    )
    return seeded(spec.seed + 2, lambda: Qwen2_5_VLForConditionalGeneration(config))


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )


def vision_tokenizer(vocab_size: int):
    """The tiny Qwen tokenizer with Qwen2.5-VL's vision special tokens appended (ids vocab_size..vocab_size+4)."""
    tok = tokenizer("qwen", vocab_size)
    tok.add_tokens(list(VISION_TOKENS), special_tokens=True)
    return tok


def vision_processor(tok):
    """A Qwen2VLProcessor over `tok` and a small PIL Qwen2VLImageProcessor (TINY_VISION_PIXELS), no video processor
    (qwen_image_edit.processor_without_video says why)."""
    from pipeline.families.qwen_image_edit import image_processor_class, processor_without_video

    least, most = TINY_VISION_PIXELS
    return processor_without_video(tok, image_processor_class()(min_pixels=least, max_pixels=most))


_AREA_LOCK = threading.RLock()


@contextlib.contextmanager
def _edit_area(module, area: int):
    """For the duration of a call: `module.calculate_dimensions(target_area, ratio)` sizes at `area` where diffusers
    asks for 1024*1024 (and proportionally for other areas: Edit-Plus' 384*384 condition images)."""
    with _AREA_LOCK:
        real = module.calculate_dimensions
        module.calculate_dimensions = lambda target_area, ratio: real(target_area * area // DIFFUSERS_EDIT_AREA, ratio)
        try:
            yield
        finally:
            module.calculate_dimensions = real


@functools.lru_cache(maxsize=None)
def tiny_edit_class(name: str):
    """A subclass of diffusers' `name` (an edit pipeline) whose calls encode the input at TINY_EDIT_AREA pixels."""
    import diffusers

    base = getattr(diffusers, name)
    module = sys.modules[base.__module__]

    @functools.wraps(base.__call__)
    def __call__(self, *args, **kwargs):
        with _edit_area(module, self.edit_area):
            return base.__call__(self, *args, **kwargs)

    return type(f"Tiny{name}", (base,), {"__call__": __call__, "edit_area": TINY_EDIT_AREA, "__module__": __name__,
                                         "__doc__": f"diffusers' {name}, its input encoded at TINY_EDIT_AREA px."})


def system_tokens(pipe) -> int:
    """How many tokens `pipe.tokenizer` makes of its prompt template's system part (up to `user\\n`)."""
    template = pipe.prompt_template_encode
    head = template[: template.index("<|im_start|>user\n") + len("<|im_start|>user\n")]
    return len(pipe.tokenizer(head).input_ids)


def build_tiny_qwen_image(spec: TinySpec, transformer=None, pipeline_class: str = "QwenImagePipeline"):
    """A Qwen-Image pipeline at toy size: Qwen2.5-VL text encoder, Qwen-Image VAE and transformer (or
    `transformer`). `pipeline_class`: QwenImagePipeline (text-to-image), or an edit pipeline (EDIT_PIPELINES)."""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    edit = pipeline_class in EDIT_PIPELINES
    if not edit and pipeline_class != "QwenImagePipeline":
        raise ValueError(f"pipeline_class must be QwenImagePipeline or one of {EDIT_PIPELINES}, got {pipeline_class!r}")
    tok = vision_tokenizer(spec.vocab_size) if edit else tokenizer("qwen", spec.vocab_size)
    if transformer is None:
        transformer = seeded(spec.seed,
                              lambda: QwenImageTransformer2DModel(**transformer_config(spec)))
    vae = _vae(spec)
    vision_ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS} if edit else None
    text_encoder = _text_encoder(spec, tok, vision_ids)
    if not edit:
        return QwenImagePipeline(scheduler=_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                 transformer=transformer)
    pipe = tiny_edit_class(pipeline_class)(scheduler=_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                           processor=vision_processor(tok), transformer=transformer)
    pipe.prompt_template_encode_start_idx = system_tokens(pipe)
    return pipe
