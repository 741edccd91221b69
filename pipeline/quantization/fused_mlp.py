"""Run a quantized MLP (fc1 -> GELU -> fc2) with GELU and fc2's input quantization in fc1's GEMM epilogue.

Unfused, fc1 writes its (tokens x 4·dim) 16-bit output, GELU reads and writes it again, and fc2's
activation kernel reads it once more to quantize it: in FLUX that tensor is the largest one a block
moves. Fused, fc1's epilogue rounds its tile as it would have stored it, applies GELU and quantizes it
for fc2 (`w4a4_gemm_gelu_quant`), so only 4-bit codes are written; Nunchaku's engine does the same.

The modules stay diffusers' own, with their paths and weights; only the class of the module that
owns the MLP is swapped for a subclass whose forward runs the pair: diffusers' FeedForward here, and
the MLP owners a family names (e.g. FLUX's single block, pipeline/families/flux/fused.py). The fused
kernel runs where the layers run the INT4 Triton kernels; elsewhere (the CPU reference) the same
modules run GELU between the layers, exactly as before.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from torch import nn

from pipeline.quantization.architecture import architecture_of
from pipeline.quantization.layers import SVDQW4A4Linear, gated, is_int4_w4a4

# Swap in the fused forwards at all? Tests compare both; SVDQ_FUSED_MLP=0 turns it off for a run.
ENABLED = os.environ.get("SVDQ_FUSED_MLP", "1") != "0"


def gelu_mlp(x: torch.Tensor, fc1: SVDQW4A4Linear, fc2: SVDQW4A4Linear, residual: Optional[torch.Tensor] = None,
             gate: Optional[torch.Tensor] = None, gated_residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fc2(gelu_tanh(fc1(x))) [+ residual, added before fc2's rounding] [then gated_residual + gate · that, in
    fc2's epilogue]; fc1 and fc2 are INT4 W4A4 layers (install_fused_mlp swaps in the fused forwards only then)."""
    from pipeline.kernels.dispatch import gelu_mlp_config, int4_dot

    mode = int4_dot(x.device, gelu_mlp_config(fc1, fc2, x.dtype, residual is not None, gate is not None))
    if mode is not None:
        from pipeline.kernels import ops

        x2 = x.reshape(-1, fc1.in_features)
        codes, scales, low = ops.w4a4_gelu_quant(
            x2, fc1.packed_codes, fc1.wscales, fc1.smooth, fc1.proj_down, fc1.proj_up, fc1.bias,
            float(fc1.act_shift), fc1.act_unsigned, fc2.smooth, fc2.proj_down, float(fc2.act_shift),
            fc2.act_unsigned, mode)
        def rows(t):
            return None if t is None else t.reshape(-1, fc2.out_features)

        y = ops.w4a4_gemm(codes, scales, fc2.packed_codes, fc2.wscales, low, fc2.proj_up, fc2.bias,
                          fc2.act_unsigned, mode, rows(residual), gate, rows(gated_residual))
        return y.reshape(*x.shape[:-1], fc2.out_features)
    return fc2(F.gelu(fc1(x), approximate="tanh"), residual=residual, gate=gate, gated_residual=gated_residual)


class FusedGeluFeedForward(FeedForward):
    """diffusers' FeedForward (GELU tanh, dropout) whose two linears run as one fused pair."""

    takes_gate = True  # layers.gated_linear hands it the gated sum

    def forward(self, hidden_states: torch.Tensor, *args, gate: Optional[torch.Tensor] = None,
                gated_residual: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """[gated_residual + gate · ] ff(hidden_states): the gated sum (AdaLN-Zero's) in fc2's epilogue."""
        if self.training:
            out = super().forward(hidden_states, *args, **kwargs)
            return gated(out, gate, gated_residual)
        return gelu_mlp(hidden_states, self.net[0].proj, self.net[2], gate=gate, gated_residual=gated_residual)


def joined(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """torch.cat([first, second], dim=1), without the copy when the two are already adjacent slices of one
    (batch, tokens, width) tensor: a single-stream block (FLUX's) returns its text and image streams as such
    slices of its output, and the next block joins them again (38 blocks, ~56 MB per join at 1024²). Under autograd or
    torch.compile it is torch.cat."""
    if (first.requires_grad or second.requires_grad or torch.compiler.is_compiling() or first.dim() != 3
            or second.dim() != 3 or first.dtype != second.dtype or first.device != second.device
            or first.shape[0] != second.shape[0] or first.shape[2] != second.shape[2]):
        return torch.cat([first, second], dim=1)
    batch, text, width = first.shape
    tokens = text + second.shape[1]
    strides = (tokens * width, width, 1)
    rows_of_one_tensor = all(t.stride()[1:] == strides[1:] and (batch == 1 or t.stride(0) == strides[0])
                             for t in (first, second))  # an image's stride does not matter when there is one
    if (first.untyped_storage()._cdata == second.untyped_storage()._cdata and rows_of_one_tensor
            and second.storage_offset() == first.storage_offset() + text * width):
        return first.as_strided((batch, tokens, width), strides, first.storage_offset())
    return torch.cat([first, second], dim=1)


def gelu_tanh(act: nn.Module) -> bool:
    return isinstance(act, (GELU, nn.GELU)) and act.approximate == "tanh"


def _fusable(owner: nn.Module) -> bool:
    if type(owner) is FeedForward:
        net = owner.net
        return (len(net) >= 3 and isinstance(net[0], GELU) and gelu_tanh(net[0]) and is_int4_w4a4(net[0].proj)
                and is_int4_w4a4(net[2])
                and all(isinstance(m, nn.Dropout) for i, m in enumerate(net) if i not in (0, 2)))
    return False


def install_fused_mlp(transformer: nn.Module, path: str) -> bool:
    """Once both layers of the MLP that owns `path` (an fc2 or proj_out) are INT4 W4A4 layers, swap its owner
    for the fused subclass (diffusers' FeedForward here; other MLP owners from the family's `Fusions.mlp_owners`);
    False where there is nothing to fuse (yet). A fused class may define `on_fused(self)`, called after the swap."""
    if not ENABLED:
        return False
    owners = architecture_of(transformer).fusions().mlp_owners
    parts = path.split(".")
    for up in (1, 2):  # FeedForward owns net.2; a block may own its MLP's last linear directly
        owner = transformer.get_submodule(".".join(parts[:-up]))
        if _fusable(owner):
            owner.__class__ = FusedGeluFeedForward
            return True
        fused, fusable = owners.get(type(owner), (None, None))
        if fused is not None and fusable(owner):
            owner.__class__ = fused
            if hasattr(owner, "on_fused"):
                owner.on_fused()
            return True
    return False
