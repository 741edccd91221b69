"""LoRAs on 4-bit (and 16-bit) transformers: read the files people download (files.py), apply them to a
transformer and take them off again exactly (apply.py).

The shared representation: a LoRA file becomes a `LoraWeights`, whose layers are keyed by the module path of the
diffusers transformer as diffusers builds it (unquantized names: `transformer_blocks.0.attn.to_q`,
`single_transformer_blocks.3.proj_out`, `transformer_blocks.0.img_mod.1`, ...), each with its down (A) and up (B)
matrices and its scale (alpha / rank, 1.0 without alpha). Where the quantized model fuses or splits those modules
(q/k/v as one layer, a split proj_out), apply.py puts each part in its place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LoraLayer:
    """One module's LoRA: delta W = scale * up @ down (fp32 as read; shapes (rank, in) and (out, rank))."""

    down: torch.Tensor  # A: (rank, in_features)
    up: torch.Tensor  # B: (out_features, rank)
    scale: float = 1.0  # alpha / rank where the file gives alpha, else 1.0

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA file, read and converted: `layers` keyed by diffusers module path (see the package docstring)."""

    name: str  # the file's stem, as metadata and <lora:name:s> show it
    path: str  # resolved path
    sha256: str
    format: str  # diffusers | kohya | ai-toolkit | bfl | xlabs | qwen-community | ...
    family: str  # the architecture it was made for ("flux", "qwen-image", ...), from its keys
    layers: dict[str, LoraLayer] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()  # keys that matched no layer (kept only with lora.strict=false)
