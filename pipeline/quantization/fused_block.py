"""FLUX's double block with AdaLN-Zero's gated residual sums in the GEMM epilogues and its second norm fused.

diffusers' FluxTransformerBlock adds each branch back as `hidden + gate · branch`: a product and a sum,
two eager passes over the (tokens x dim) activations after the GEMM that wrote the branch. Here the
branch's last GEMM (attention's to_out / to_add_out, the MLP's fc2) computes the gated sum in its
epilogue with diffusers' roundings (the branch output, the product and the sum, each rounded). The block's
second norm and its modulation run as one kernel where the first norm does (fused_norm.py). FLUX's single
block gets the gated sum in proj_out's epilogue (fused_mlp.FusedMLPFluxSingleTransformerBlock).

The module keeps diffusers' paths and weights; only its class becomes this subclass, whose forward is
diffusers' (0.42) with those steps fused: a diffusers whose block forward takes other arguments keeps its
own. Where the kernels don't run every step is diffusers' op, bit for bit. `SVDQ_FUSED_GATE=0` turns it off.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Optional

import torch
from diffusers.models.transformers.transformer_flux import FluxTransformerBlock
from torch import nn

from pipeline.quantization.fused_attention import FusedRopeFluxAttnProcessor
from pipeline.quantization.fused_mlp import FusedGeluFeedForward
from pipeline.quantization.fused_norm import FusedAdaLayerNormZero, modulate
from pipeline.quantization.layers import gated

ENABLED = os.environ.get("SVDQ_FUSED_GATE", "1") != "0"

_BLOCK_ARGS = ("self", "hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs")
_BLOCK_MATCHES = tuple(inspect.signature(FluxTransformerBlock.forward).parameters) == _BLOCK_ARGS


def _gated_ff(ff: nn.Module, x: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    if isinstance(ff, FusedGeluFeedForward):
        return ff(x, gate=gate, gated_residual=residual)
    return gated(ff(x), gate, residual)


class FusedFluxTransformerBlock(FluxTransformerBlock):
    """diffusers' FluxTransformerBlock with its gated residual sums in the GEMMs' epilogues."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                joint_attention_kwargs: Optional[dict[str, Any]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        # diffusers' FluxTransformerBlock.forward, each `x + gate * branch` computed where the branch ends
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, emb=temb)
        kwargs = dict(joint_attention_kwargs or {})
        gate_in_attention = isinstance(self.attn.processor, FusedRopeFluxAttnProcessor)
        if gate_in_attention:
            kwargs.update(gate=gate_msa, residual=hidden_states, context_gate=c_gate_msa,
                          context_residual=encoder_hidden_states)
        attention_outputs = self.attn(hidden_states=norm_hidden_states,
                                      encoder_hidden_states=norm_encoder_hidden_states,
                                      image_rotary_emb=image_rotary_emb, **kwargs)
        ip_attn_output = attention_outputs[2] if len(attention_outputs) == 3 else None
        if gate_in_attention:
            hidden_states, encoder_hidden_states = attention_outputs[:2]
        else:
            hidden_states = gated(attention_outputs[0], gate_msa, hidden_states)
            encoder_hidden_states = gated(attention_outputs[1], c_gate_msa, encoder_hidden_states)

        fused_norm = isinstance(self.norm1, FusedAdaLayerNormZero)  # the norm fusion is on for this block
        norm_hidden_states = modulate(self.norm2, hidden_states, scale_mlp, shift_mlp, fused_norm)
        hidden_states = _gated_ff(self.ff, norm_hidden_states, gate_mlp, hidden_states)
        if ip_attn_output is not None:
            hidden_states = hidden_states + ip_attn_output

        norm_encoder_hidden_states = modulate(self.norm2_context, encoder_hidden_states, c_scale_mlp, c_shift_mlp,
                                              fused_norm)
        encoder_hidden_states = _gated_ff(self.ff_context, norm_encoder_hidden_states, c_gate_mlp,
                                          encoder_hidden_states)
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


def install_fused_block(transformer: nn.Module, path: str) -> bool:
    """Once a FLUX double block's modulation linear (`path`, e.g. transformer_blocks.3.norm1.linear) is in place,
    swap the block for the fused subclass; False for anything else."""
    parts = path.split(".")
    if not (ENABLED and _BLOCK_MATCHES and len(parts) > 2):
        return False
    owner = transformer.get_submodule(".".join(parts[:-2]))
    if type(owner) is not FluxTransformerBlock:
        return False
    owner.__class__ = FusedFluxTransformerBlock
    return True
