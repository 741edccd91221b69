"""FLUX.1's SVDQuant targets and file conventions, as Nunchaku's FLUX files hold them.

Targets: each double block is a dual-stream block (fused q/k/v per stream, both output projections, both MLPs)
plus its two AdaLN modulations (norm1.linear, norm1_context.linear) as AWQ W4A16; each single block has its
modulation (norm.linear, AWQ), fused q/k/v, proj_mlp (`mlp_fc1`) and proj_out split by input into the
attention half (`attn.to_out`) and the MLP half (`mlp_fc2`, GELU inputs). The modulations are about a quarter of
the weights; files that hold them in 16 bits still load (the targets are optional when reading). Checked against
DeepCompressor's writer (backend/nunchaku/convert.py) and Nunchaku's loader (transformer_flux_v2.py).

Files: every FLUX file Nunchaku publishes uses the legacy per-block names (`qkv_proj`, `out_proj`, `mlp_fc1`,
..., with the per-head q/k RMSNorm weights outside `attn.`), the only FLUX naming its loaders read, and carries
ComfyUI's own `comfy_config`. This project's older FLUX files use diffusers names and hold the AdaLN scale
bias without the "+1" Nunchaku folds in; they still load as written.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.quantization.file_names import LegacyNames
from pipeline.quantization.targets import Target, awq_modulation, joint_block, qkv

_NORMS = {"norm_q": "attn.norm_q", "norm_k": "attn.norm_k"}
LEGACY_NAMES = LegacyNames({
    "transformer_blocks": {"qkv_proj": "attn.to_qkv", "qkv_proj_context": "attn.add_qkv_proj",
                           "out_proj": "attn.to_out.0", "out_proj_context": "attn.to_add_out",
                           "mlp_fc1": "ff.net.0.proj", "mlp_fc2": "ff.net.2", "mlp_context_fc1": "ff_context.net.0.proj",
                           "mlp_context_fc2": "ff_context.net.2", **_NORMS, "norm_added_q": "attn.norm_added_q",
                           "norm_added_k": "attn.norm_added_k"},
    "single_transformer_blocks": {"qkv_proj": "attn.to_qkv", "out_proj": "attn.to_out", "mlp_fc1": "mlp_fc1",
                                  "mlp_fc2": "mlp_fc2", **_NORMS},
})
BLOCK_STACKS = {"transformer_blocks": "num_layers", "single_transformer_blocks": "num_single_layers"}
MODEL_CLASS = "NunchakuFluxTransformer2dModel"
MODEL_CLASSES = ("NunchakuFluxTransformer2dModelV2",)


def flux_targets(transformer: nn.Module) -> list[Target]:
    out: list[Target] = []
    for i, _ in enumerate(transformer.transformer_blocks):
        p = f"transformer_blocks.{i}."
        out += joint_block(p, "ff", "ff_context")
        out += [awq_modulation(f"{p}norm1.linear", 6, True), awq_modulation(f"{p}norm1_context.linear", 6, True)]
    for i, block in enumerate(transformer.single_transformer_blocks):
        p = f"single_transformer_blocks.{i}."
        out.append(awq_modulation(f"{p}norm.linear", 3, True))
        dim = block.proj_mlp.in_features
        total = block.proj_out.in_features
        out += [qkv(p, "attn.to_qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
                Target(f"{p}mlp_fc1", (f"{p}proj_mlp",)),
                Target(f"{p}attn.to_out", (f"{p}proj_out",), cols=(0, dim)),
                Target(f"{p}mlp_fc2", (f"{p}proj_out",), cols=(dim, total), after_gelu=True)]
    return out


def owns_keys(keys: list[str]) -> bool:
    """A FLUX file: it has single blocks (no other architecture here does)."""
    return any(k.startswith("single_transformer_blocks.") for k in keys)


def comfy_config(config: dict[str, Any]) -> dict[str, Any]:
    """The `comfy_config` metadata of a FLUX file: ComfyUI's own model class and settings, from which
    ComfyUI-nunchaku builds the model (nodes/models/flux.py; "FluxSchnell" for a model without guidance
    embedding, else "Flux"). ComfyUI counts latent channels before diffusers' 2x2 packing: 64 -> 16, patch 2.
    Nunchaku's Qwen-Image files carry none (its ComfyUI loader reads only quantization_config)."""
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    channels = config.get("in_channels", 64)
    guidance = bool(config.get("guidance_embeds", False))
    return {"model_class": "Flux" if guidance else "FluxSchnell", "model_config": {
        "axes_dim": list(config.get("axes_dims_rope", (16, 56, 56))),
        "context_in_dim": config.get("joint_attention_dim", 4096), "depth": config["num_layers"],
        "depth_single_blocks": config["num_single_layers"], "disable_unet_model_creation": True,
        "guidance_embed": guidance, "hidden_size": heads * head_dim, "image_model": "flux",
        "in_channels": channels // 4, "mlp_ratio": 4.0, "num_heads": heads,
        "out_channels": (config.get("out_channels") or channels) // 4, "patch_size": 2, "qkv_bias": True,
        "theta": 10000, "vec_in_dim": config.get("pooled_projection_dim", 768)}}
