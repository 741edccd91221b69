"""diffusers' AdaLN-Zero modules (AdaLayerNormZero, AdaLayerNormZeroSingle: e.g. FLUX's norm1, norm1_context and
single blocks' norm) with their LayerNorm and modulation in one kernel (pipeline/kernels/triton_norm.py): one pass over the activations instead of three in eager mode.

The modules stay diffusers' own (paths, weights, the modulation linear, AWQ once quantized); only their
class becomes a subclass whose forward calls `svdq::adaln_modulate` where the Triton kernels run. Elsewhere
(the CPU reference) it is diffusers' forward, bit for bit. `SVDQ_FUSED_NORM=0` turns it off for a run.
"""

from __future__ import annotations

import os

import torch
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle
from torch import nn

from pipeline.quantization.diffusers_compat import same_parameters

ENABLED = os.environ.get("SVDQ_FUSED_NORM", "1") != "0"


def modulate(norm: nn.Module, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
             use_kernel: bool = True) -> torch.Tensor:
    """norm(x)·(1 + scale) + shift: one kernel where it runs (use_kernel, a LayerNorm without affine, 16-bit
    or fp32 activations of one dtype), else diffusers' three ops."""
    from pipeline.kernels.dispatch import adaln_config, plain_kernels

    if (use_kernel and type(norm) is nn.LayerNorm and not norm.elementwise_affine and x.dim() == 3
            and scale.dtype == x.dtype and plain_kernels(x.device, adaln_config(x.dtype))):
        from pipeline.kernels import ops

        return ops.adaln_modulate(x, scale, shift, float(norm.eps))
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


class FusedAdaLayerNormZero(AdaLayerNormZero):
    """diffusers' AdaLayerNormZero (no label embedding) with norm + modulation in one kernel."""

    def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        # diffusers' forward, with the last line's three passes as one
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        return modulate(self.norm, x, scale_msa, shift_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class FusedAdaLayerNormZeroSingle(AdaLayerNormZeroSingle):
    """diffusers' AdaLayerNormZeroSingle with norm + modulation in one kernel."""

    def forward(self, x, emb=None):
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
        return modulate(self.norm, x, scale_msa, shift_msa), gate_msa


FUSED_CLASSES = {AdaLayerNormZero: FusedAdaLayerNormZero, AdaLayerNormZeroSingle: FusedAdaLayerNormZeroSingle}
# The forwards above are diffusers' (0.42); a diffusers whose forwards take other arguments keeps its own.
_MATCHES = {AdaLayerNormZero: same_parameters(AdaLayerNormZero.forward, "self", "x", "timestep", "class_labels",
                                              "hidden_dtype", "emb"),
            AdaLayerNormZeroSingle: same_parameters(AdaLayerNormZeroSingle.forward, "self", "x", "emb")}


def _fusable(owner: nn.Module) -> bool:
    norm = getattr(owner, "norm", None)
    return (type(owner) in FUSED_CLASSES and _MATCHES[type(owner)] and getattr(owner, "emb", None) is None
            and type(norm) is nn.LayerNorm and not norm.elementwise_affine and len(norm.normalized_shape) == 1)


def install_fused_norm(transformer: nn.Module, path: str) -> bool:
    """Once the modulation linear at `path` is in place, swap its AdaLN-Zero owner for the fused subclass;
    False where the owner is not one (a modulation that sits in its block: the block fuses its norms itself)."""
    parent = path.rpartition(".")[0]
    if not ENABLED or not parent:
        return False
    owner = transformer.get_submodule(parent)
    if not _fusable(owner):
        return False
    owner.__class__ = FUSED_CLASSES[type(owner)]
    return True
