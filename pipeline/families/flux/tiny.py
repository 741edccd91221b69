"""FLUX.1 at toy size, built in-process: CLIP + T5 text encoders, an 8x VAE with 16 latent channels, the transformer."""

from __future__ import annotations

from pipeline.config.schema import TinySpec
from pipeline.models.tiny import rope_axes, seeded, tiny_vae, tokenizer


def transformer_config(spec: TinySpec, in_channels: int = 64, out_channels=None) -> dict:
    """FluxTransformer2DModel's config at toy size (64 = 16 latent channels packed 2x2, as in FLUX.1)."""
    return dict(in_channels=in_channels, num_layers=spec.num_layers, attention_head_dim=spec.attention_head_dim,
                num_attention_heads=spec.num_attention_heads, joint_attention_dim=spec.text_hidden_size,
                axes_dims_rope=rope_axes(spec.attention_head_dim), patch_size=1,
                num_single_layers=spec.num_single_layers, pooled_projection_dim=spec.text_hidden_size,
                guidance_embeds=spec.guidance_embeds, **({"out_channels": out_channels} if out_channels else {}))


def build_tiny_flux(spec: TinySpec, transformer=None, pipeline_class: str = "FluxPipeline", config=None):
    """A FLUX.1 pipeline (`pipeline_class`: FluxPipeline, or a variant taking the same components) with every
    component at toy size (VAE downsamples by 8, like FLUX.1); `transformer`, if given, is used instead of the
    seeded one (a quantized transformer built from a file); `config`: the transformer's config, if not the
    text-to-image one."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok = tokenizer("clip", spec.vocab_size)
    t5_tok = tokenizer("t5", spec.vocab_size)
    text_dim = spec.text_hidden_size
    if transformer is None:
        transformer = seeded(spec.seed, lambda: FluxTransformer2DModel(**(config or transformer_config(spec))))
    vae = tiny_vae(spec, shift_factor=0.0609, scaling_factor=1.5035)
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
    text_encoder = seeded(spec.seed + 2, lambda: CLIPTextModel(clip_cfg))
    text_encoder_2 = seeded(spec.seed + 3, lambda: T5EncoderModel(t5_cfg))
    return getattr(diffusers, pipeline_class)(
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
