"""Qwen-Image's SVDQuant targets and file conventions, as Nunchaku's Qwen-Image files hold them.

Targets: every block is a dual-stream block (fused q/k/v per stream, both output projections, both MLPs) plus
its two modulations, img_mod.1 and txt_mod.1 ((shift, scale, gate) for attention, then for the MLP), as AWQ
W4A16. Files use diffusers' module paths (the only naming Qwen-Image files have) and carry no comfy_config
(ComfyUI-nunchaku's Qwen-Image loader reads only quantization_config).
"""

from __future__ import annotations

from torch import nn

from pipeline.quantization.targets import Target, awq_modulation, joint_block

BLOCK_STACKS = {"transformer_blocks": "num_layers"}
MODEL_CLASS = "NunchakuQwenImageTransformer2DModel"


def qwen_image_targets(transformer: nn.Module) -> list[Target]:
    out: list[Target] = []
    for i, _ in enumerate(transformer.transformer_blocks):
        p = f"transformer_blocks.{i}."
        out += [*joint_block(p, "img_mlp", "txt_mlp"),
                # img_mod/txt_mod = (shift, scale, gate) for attention, then for the MLP.
                awq_modulation(f"{p}img_mod.1", 6), awq_modulation(f"{p}txt_mod.1", 6)]
    return out


def owns_keys(keys: list[str]) -> bool:
    """A Qwen-Image file: its blocks have img_mod / img_mlp."""
    return any(".img_mod." in k or ".img_mlp." in k for k in keys)
