"""Which layers SVDQuant replaces, per model family, under the names Nunchaku's files use.

A target is one quantized layer in the checkpoint. `parts` are the diffusers modules whose
weights it fuses along the output dimension (q, k, v share an input); `cols` selects an input
slice (FLUX single blocks' proj_out is split into its attention and MLP halves). The second
linear of every MLP takes GELU outputs: `after_gelu` marks it for unsigned INT4 activations.
Embedders, norms and the final projection stay 16-bit. The AdaLN modulation linears use 4-bit
weights with 16-bit activations (AWQ format), as the Nunchaku engine patches both FLUX
(norm1.linear, norm1_context.linear, single blocks' norm.linear) and Qwen-Image (img_mod.1,
txt_mod.1): in FLUX they are about a quarter of the transformer's weights. FLUX files without them
(16-bit modulation) still load: those targets are `optional` when reading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn


@dataclass(frozen=True)
class Target:
    name: str
    parts: tuple[str, ...]
    kind: str = "w4a4"  # w4a4 | awq
    after_gelu: bool = False
    cols: Optional[tuple[int, int]] = None
    mod_chunks: int = 0  # awq modulation: number of chunks (shift, scale, gate, ...)
    scale_chunks: tuple[int, ...] = field(default=())  # which chunks are AdaLN scales (+1 folded)
    optional: bool = False  # reading: quantized only if the file holds it, else a 16-bit tensor


def _qkv(prefix: str, name: str, q: str, k: str, v: str) -> Target:
    return Target(f"{prefix}{name}", (f"{prefix}{q}", f"{prefix}{k}", f"{prefix}{v}"))


def _mlp(prefix: str, path: str) -> list[Target]:
    return [Target(f"{prefix}{path}.net.0.proj", (f"{prefix}{path}.net.0.proj",)),
            Target(f"{prefix}{path}.net.2", (f"{prefix}{path}.net.2",), after_gelu=True)]


def _joint_block(p: str, image_mlp: str, text_mlp: str) -> list[Target]:
    """A dual-stream block (FLUX double block, Qwen-Image block): image and text attention + MLPs."""
    return [_qkv(p, "attn.to_qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
            _qkv(p, "attn.add_qkv_proj", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            Target(f"{p}attn.to_out.0", (f"{p}attn.to_out.0",)),
            Target(f"{p}attn.to_add_out", (f"{p}attn.to_add_out",)),
            *_mlp(p, image_mlp), *_mlp(p, text_mlp)]


def _awq_modulation(path: str, chunks: int, optional: bool = False) -> Target:
    """AdaLN modulation: chunks (shift, scale, gate)[, again for the MLP]; scales are chunks 1 (and 4)."""
    return Target(path, (path,), kind="awq", mod_chunks=chunks, scale_chunks=(1, 4) if chunks == 6 else (1,),
                  optional=optional)


def flux_targets(transformer: nn.Module) -> list[Target]:
    out: list[Target] = []
    for i, _ in enumerate(transformer.transformer_blocks):
        p = f"transformer_blocks.{i}."
        out += _joint_block(p, "ff", "ff_context")
        out += [_awq_modulation(f"{p}norm1.linear", 6, True), _awq_modulation(f"{p}norm1_context.linear", 6, True)]
    for i, block in enumerate(transformer.single_transformer_blocks):
        p = f"single_transformer_blocks.{i}."
        out.append(_awq_modulation(f"{p}norm.linear", 3, True))
        dim = block.proj_mlp.in_features
        total = block.proj_out.in_features
        out += [_qkv(p, "attn.to_qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
                Target(f"{p}mlp_fc1", (f"{p}proj_mlp",)),
                Target(f"{p}attn.to_out", (f"{p}proj_out",), cols=(0, dim)),
                Target(f"{p}mlp_fc2", (f"{p}proj_out",), cols=(dim, total), after_gelu=True)]
    return out


def qwen_image_targets(transformer: nn.Module) -> list[Target]:
    out: list[Target] = []
    for i, _ in enumerate(transformer.transformer_blocks):
        p = f"transformer_blocks.{i}."
        out += [*_joint_block(p, "img_mlp", "txt_mlp"),
                # img_mod/txt_mod = (shift, scale, gate) for attention, then for the MLP.
                _awq_modulation(f"{p}img_mod.1", 6), _awq_modulation(f"{p}txt_mod.1", 6)]
    return out


TARGETS = {"flux": flux_targets, "qwen-image": qwen_image_targets}
TRANSFORMER_FAMILIES = {"FluxTransformer2DModel": "flux", "QwenImageTransformer2DModel": "qwen-image"}


def family_of(transformer: nn.Module) -> str:
    name = type(transformer).__name__
    if name not in TRANSFORMER_FAMILIES:
        raise ValueError(f"SVDQuant supports {', '.join(TRANSFORMER_FAMILIES)}; got {name}")
    return TRANSFORMER_FAMILIES[name]


def targets_for(transformer: nn.Module) -> list[Target]:
    return TARGETS[family_of(transformer)](transformer)
