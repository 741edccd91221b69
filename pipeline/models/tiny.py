"""Toy-size FLUX and Qwen-Image pipelines built in-process: real diffusers classes, seeded weights.

Why: tests and the default run need the real architectures (so quantization touches the same
module paths as on the full models) without any download. Tokenizers are trained in-process on a
small built-in corpus, so everything here is offline and deterministic.
"""

from __future__ import annotations

import functools

import torch

from pipeline.config.schema import ModelConfig, TinySpec

# A fixed corpus: enough English for a byte-level BPE to learn common words, plus the chat
# template Qwen-Image wraps prompts in.
_CORPUS = [
    "a photo of a cat sitting on a red chair in the sun",
    "a watercolor painting of a lighthouse on a rocky coast at dawn",
    "a bowl of ramen with an egg, studio lighting, product shot",
    "an astronaut riding a horse on the moon, cinematic, detailed",
    "a small robot reading a book in a cozy library, warm colors",
    "the word hello written in neon letters on a brick wall",
    "a blue ceramic mug on a wooden table, soft shadows, minimal",
    "a city street at night in the rain with reflections",
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background",
    "blurry, low quality, watermark, distorted, bad anatomy, text, jpeg artifacts",
]
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _train_bpe(specials: list[str], vocab_size: int, eos: str | None):
    """Train a byte-level BPE tokenizer on the built-in corpus (deterministic, milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    if eos is not None:  # CLIP and T5 append an end token; CLIP pools the hidden state there
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", special_tokens=[(eos, tok.token_to_id(eos))]
        )
    return tok


def _fast_tokenizer(specials: list[str], vocab_size: int, max_length: int, pad: str, eos: str | None):
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(specials, vocab_size, eos)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, eos_token=eos or pad, model_max_length=max_length
    )


@functools.lru_cache(maxsize=None)
def _tokenizer_cached(kind: str, vocab_size: int):
    if kind == "clip":
        return _fast_tokenizer(["<|pad|>", "<|endoftext|>"], vocab_size, 77, "<|pad|>", "<|endoftext|>")
    if kind == "t5":
        return _fast_tokenizer(["<pad>", "</s>", "<unk>"], vocab_size, 512, "<pad>", "</s>")
    return _fast_tokenizer(_QWEN_SPECIALS, vocab_size, 32768, "<|endoftext|>", None)


def _tokenizer(kind: str, vocab_size: int):
    """A fresh copy each call, so callers may mutate it without leaking into other pipelines."""
    import copy

    return copy.deepcopy(_tokenizer_cached(kind, vocab_size))


def _seeded(seed: int, build):
    """Build a module under a fixed seed without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def build_tiny_flux(spec: TinySpec, transformer=None):
    """A FluxPipeline with every component at toy size (VAE downsamples by 8, like FLUX.1); `transformer`, if
    given, is used instead of the seeded one (a quantized transformer built from a file)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok = _tokenizer("clip", spec.vocab_size)
    t5_tok = _tokenizer("t5", spec.vocab_size)
    text_dim = spec.text_hidden_size
    if transformer is None:
        transformer = _seeded(spec.seed, lambda: FluxTransformer2DModel(**tiny_transformer_config("flux", spec)))
    vae = _seeded(
        spec.seed + 1,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[8, 8, 16, 16],
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            sample_size=spec.sample_size,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        ),
    )
    clip_cfg = CLIPTextConfig(
        vocab_size=len(clip_tok),
        hidden_size=text_dim,
        intermediate_size=text_dim * 2,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=2,
        projection_dim=text_dim,
        max_position_embeddings=77,
        pad_token_id=clip_tok.pad_token_id,
        eos_token_id=clip_tok.eos_token_id,
        bos_token_id=clip_tok.eos_token_id,
    )
    t5_cfg = T5Config(
        vocab_size=len(t5_tok),
        d_model=text_dim,
        d_kv=16,
        d_ff=text_dim * 2,
        num_layers=spec.text_layers,
        num_heads=2,
        pad_token_id=t5_tok.pad_token_id,
        eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id,
    )
    text_encoder = _seeded(spec.seed + 2, lambda: CLIPTextModel(clip_cfg))
    text_encoder_2 = _seeded(spec.seed + 3, lambda: T5EncoderModel(t5_cfg))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
        ),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def _flux_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Split the head dim over (text, height, width) rope axes like FLUX's (16, 56, 56) of 128."""
    if head_dim % 4:
        raise ValueError(f"attention_head_dim must be a multiple of 4 for rope axes, got {head_dim}")
    side = (head_dim * 7 // 16) // 2 * 2
    return (head_dim - 2 * side, side, side)


def build_tiny_qwen_image(spec: TinySpec, transformer=None):
    """A QwenImagePipeline at toy size: Qwen2.5-VL text encoder, Qwen-Image VAE and transformer (or `transformer`)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _tokenizer("qwen", spec.vocab_size)
    text_dim = spec.text_hidden_size
    if transformer is None:
        transformer = _seeded(spec.seed,
                              lambda: QwenImageTransformer2DModel(**tiny_transformer_config("qwen-image", spec)))
    vae = _seeded(
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
    text_heads = 2
    half = text_dim // text_heads // 2  # mrope sections split the rotary half-dim in 3
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
        # Ids past the vocabulary: the tiny encoder never sees image tokens.
        vision_start_token_id=len(tok) + 1,
        vision_end_token_id=len(tok) + 2,
        vision_token_id=len(tok) + 3,
        image_token_id=len(tok) + 4,
        video_token_id=len(tok) + 5,
    )
    text_encoder = _seeded(spec.seed + 2, lambda: Qwen2_5_VLForConditionalGeneration(config))
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
        ),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
    )


def tiny_transformer_config(family: str, spec: TinySpec) -> dict:
    """The diffusers config of a tiny transformer: the real architecture at toy width and depth."""
    common = dict(in_channels=64,  # 16 latent channels packed 2x2, as in FLUX.1 and Qwen-Image
                  num_layers=spec.num_layers, attention_head_dim=spec.attention_head_dim,
                  num_attention_heads=spec.num_attention_heads, joint_attention_dim=spec.text_hidden_size,
                  axes_dims_rope=_flux_rope_axes(spec.attention_head_dim))
    if family == "flux":
        return dict(common, patch_size=1, num_single_layers=spec.num_single_layers,
                    pooled_projection_dim=spec.text_hidden_size, guidance_embeds=spec.guidance_embeds)
    return dict(common, patch_size=2, out_channels=16, guidance_embeds=False)


TINY_BUILDERS = {"flux": build_tiny_flux, "qwen-image": build_tiny_qwen_image}


def build_tiny(model: ModelConfig, transformer=None):
    return TINY_BUILDERS[model.family](model.tiny, transformer)
