"""Z-Image at toy size, built in-process: a Qwen3 text encoder with a chat-templated tokenizer, an 8x VAE with 16
latent channels (Z-Image uses FLUX.1's VAE), the transformer."""

from __future__ import annotations

from pipeline.config.schema import TinySpec
from pipeline.models.tiny import rope_axes, seeded, tiny_vae, tokenizer

# The chat format Qwen3's tokenizer renders (ZImagePipeline asks for add_generation_prompt=True,
# enable_thinking=True: no empty think block); the tiny tokenizer has no template of its own.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def transformer_config(spec: TinySpec) -> dict:
    """ZImageTransformer2DModel's config at toy size. The SwiGLU's width is int(dim / 3 * 8), so quantizable widths
    (multiples of 128 for Nunchaku's tile layout) need dim a multiple of 384: conf/model/tiny-z-image.yaml has 3
    heads of 128. Lists, not tuples: a file's config (JSON) is compared with this one."""
    return dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16,
                dim=spec.num_attention_heads * spec.attention_head_dim, n_layers=spec.num_layers, n_refiner_layers=2,
                n_heads=spec.num_attention_heads, n_kv_heads=spec.num_attention_heads, norm_eps=1e-5, qk_norm=True,
                cap_feat_dim=spec.text_hidden_size, rope_theta=256.0, t_scale=1000.0,
                axes_dims=list(rope_axes(spec.attention_head_dim)), axes_lens=[1024, 512, 512])


def build_tiny_z_image(spec: TinySpec, transformer=None):
    """A ZImagePipeline at toy size: Qwen3 text encoder, 8x VAE, transformer (or `transformer`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tok = tokenizer("qwen", spec.vocab_size)
    tok.chat_template = CHAT_TEMPLATE
    text_dim, text_heads = spec.text_hidden_size, 2
    if transformer is None:
        transformer = seeded(spec.seed, lambda: ZImageTransformer2DModel(**transformer_config(spec)))
    vae = tiny_vae(spec, shift_factor=0.1159, scaling_factor=0.3611)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=text_dim,
        intermediate_size=text_dim * 2,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        head_dim=text_dim // text_heads,
        max_position_embeddings=2048,
        rope_theta=1000000.0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.pad_token_id,
    )
    text_encoder = seeded(spec.seed + 2, lambda: Qwen3Model(config))
    return ZImagePipeline(
        # Z-Image-Turbo's scheduler: a fixed shift of 3 (ZImagePipeline's own sigmas, no dynamic shifting)
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
    )
