"""What SVDQuant replaces: one `Target` per quantized layer, under the name Nunchaku's files use.

A target is one quantized layer in the checkpoint. `parts` are the diffusers modules whose
weights it fuses along the output dimension (q, k, v share an input); `cols` selects an input
slice (FLUX single blocks' proj_out is split into its attention and MLP halves). The second
linear of every MLP takes GELU outputs: `after_gelu` marks it for unsigned INT4 activations.
Embedders, norms and the final projection stay 16-bit. AdaLN modulation linears use 4-bit weights
with 16-bit activations (AWQ format, `kind="awq"`); a target that files may also hold in 16 bits is
`optional` when reading. Each family lists its targets with the builders below (pipeline/families/).
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


def qkv(prefix: str, name: str, q: str, k: str, v: str) -> Target:
    return Target(f"{prefix}{name}", (f"{prefix}{q}", f"{prefix}{k}", f"{prefix}{v}"))


def mlp(prefix: str, path: str) -> list[Target]:
    return [Target(f"{prefix}{path}.net.0.proj", (f"{prefix}{path}.net.0.proj",)),
            Target(f"{prefix}{path}.net.2", (f"{prefix}{path}.net.2",), after_gelu=True)]


def joint_block(p: str, image_mlp: str, text_mlp: str) -> list[Target]:
    """A dual-stream (MMDiT) block: image and text attention + MLPs, under diffusers' joint-attention names."""
    return [qkv(p, "attn.to_qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
            qkv(p, "attn.add_qkv_proj", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            Target(f"{p}attn.to_out.0", (f"{p}attn.to_out.0",)),
            Target(f"{p}attn.to_add_out", (f"{p}attn.to_add_out",)),
            *mlp(p, image_mlp), *mlp(p, text_mlp)]


def awq_modulation(path: str, chunks: int, optional: bool = False) -> Target:
    """AdaLN modulation: chunks (shift, scale, gate)[, again for the MLP]; scales are chunks 1 (and 4)."""
    return Target(path, (path,), kind="awq", mod_chunks=chunks, scale_chunks=(1, 4) if chunks == 6 else (1,),
                  optional=optional)


def targets_for(transformer: nn.Module) -> list[Target]:
    """The targets of a transformer, as its family's architecture lists them (architecture.py)."""
    from pipeline.quantization.architecture import architecture_of

    return architecture_of(transformer).targets(transformer)


def family_of(transformer: nn.Module) -> str:
    """The architecture name of a transformer ("flux" for every FluxTransformer2DModel)."""
    from pipeline.quantization.architecture import architecture_of

    return architecture_of(transformer).name
