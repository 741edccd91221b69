"""Qwen-Image at toy size, built in-process: a Qwen2.5-VL text encoder, the Qwen-Image VAE and transformer."""

from __future__ import annotations

from pipeline.config.schema import TinySpec
from pipeline.models.tiny import rope_axes, seeded, tokenizer


def transformer_config(spec: TinySpec) -> dict:
    """QwenImageTransformer2DModel's config at toy size (64 = 16 latent channels packed 2x2, as in Qwen-Image)."""
    return dict(in_channels=64, num_layers=spec.num_layers, attention_head_dim=spec.attention_head_dim,
                num_attention_heads=spec.num_attention_heads, joint_attention_dim=spec.text_hidden_size,
                axes_dims_rope=rope_axes(spec.attention_head_dim), patch_size=2, out_channels=16,
                guidance_embeds=False)


def build_tiny_qwen_image(spec: TinySpec, transformer=None):
    """A QwenImagePipeline at toy size: Qwen2.5-VL text encoder, Qwen-Image VAE and transformer (or `transformer`)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = tokenizer("qwen", spec.vocab_size)
    text_dim = spec.text_hidden_size
    if transformer is None:
        transformer = seeded(spec.seed,
                              lambda: QwenImageTransformer2DModel(**transformer_config(spec)))
    vae = seeded(
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
    text_encoder = seeded(spec.seed + 2, lambda: Qwen2_5_VLForConditionalGeneration(config))
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
