"""Double blocks (FLUX, Qwen-Image) with AdaLN-Zero's gated residual sums in the GEMM epilogues and their
norms + modulation as one kernel.

diffusers' blocks add each branch back as `hidden + gate · branch`: a product and a sum, two eager passes
over the (tokens x dim) activations after the GEMM that wrote the branch. Here the branch's last GEMM
(attention's to_out / to_add_out, the MLP's fc2) computes the gated sum in its epilogue with diffusers'
roundings (the branch output, the product and the sum, each rounded). The norms the block modulates
itself (FLUX's norm2 and norm2_context; all four of Qwen-Image's) run as one kernel each where the norm
fusion is on (fused_norm.py). FLUX's single block gets the gated sum in proj_out's epilogue
(fused_mlp.FusedMLPFluxSingleTransformerBlock).

The modules keep diffusers' paths and weights; only a block's class becomes the subclass, whose forward is
diffusers' (0.42) with those steps fused: a diffusers whose block forward takes other arguments keeps its
own. Where the kernels don't run every step is diffusers' op, bit for bit. `SVDQ_FUSED_GATE=0` turns it off.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from diffusers.models.transformers.transformer_flux import FluxTransformerBlock
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
from torch import nn

from pipeline.quantization.diffusers_compat import same_parameters
from pipeline.quantization.fused_attention import FusedRopeFluxAttnProcessor
from pipeline.quantization.fused_norm import FusedAdaLayerNormZero, modulate
from pipeline.quantization.fused_qkv import FusedQKVQwenProcessor
from pipeline.quantization.layers import gated, gated_linear

ENABLED = os.environ.get("SVDQ_FUSED_GATE", "1") != "0"

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

        norm_kernel = isinstance(self.norm1, FusedAdaLayerNormZero)  # the norm fusion is on for this block
        norm_hidden_states = modulate(self.norm2, hidden_states, scale_mlp, shift_mlp, norm_kernel)
        hidden_states = gated_linear(self.ff, norm_hidden_states, gate_mlp, hidden_states)
        if ip_attn_output is not None:
            hidden_states = hidden_states + ip_attn_output

        norm_encoder_hidden_states = modulate(self.norm2_context, encoder_hidden_states, c_scale_mlp, c_shift_mlp,
                                              norm_kernel)
        encoder_hidden_states = gated_linear(self.ff_context, norm_encoder_hidden_states, c_gate_mlp,
                                          encoder_hidden_states)
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


class FusedQwenImageTransformerBlock(QwenImageTransformerBlock):
    """diffusers' QwenImageTransformerBlock with its gated residual sums in the GEMMs' epilogues and, with
    norm_kernel, each norm + modulation as one kernel. Edit models' per-token modulation (modulate_index)
    and zero_cond_t run diffusers' forward."""

    norm_kernel = False

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb=None,
                joint_attention_kwargs=None, modulate_index=None):
        if modulate_index is not None or self.zero_cond_t:
            return super().forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                                   image_rotary_emb, joint_attention_kwargs, modulate_index)
        # diffusers' QwenImageTransformerBlock.forward, each `x + gate * branch` computed where the branch ends
        img_mod1, img_mod2 = self.img_mod(temb).chunk(2, dim=-1)
        txt_mod1, txt_mod2 = self.txt_mod(temb).chunk(2, dim=-1)
        img_shift1, img_scale1, img_gate1 = img_mod1.chunk(3, dim=-1)
        txt_shift1, txt_scale1, txt_gate1 = txt_mod1.chunk(3, dim=-1)
        img_modulated = modulate(self.img_norm1, hidden_states, img_scale1, img_shift1, self.norm_kernel)
        txt_modulated = modulate(self.txt_norm1, encoder_hidden_states, txt_scale1, txt_shift1, self.norm_kernel)
        kwargs = dict(joint_attention_kwargs or {})
        gate_in_attention = isinstance(self.attn.processor, FusedQKVQwenProcessor)
        if gate_in_attention:
            kwargs.update(gate=img_gate1, residual=hidden_states, context_gate=txt_gate1,
                          context_residual=encoder_hidden_states)
        img_attn_output, txt_attn_output = self.attn(hidden_states=img_modulated,
                                                     encoder_hidden_states=txt_modulated,
                                                     encoder_hidden_states_mask=encoder_hidden_states_mask,
                                                     image_rotary_emb=image_rotary_emb, **kwargs)
        if gate_in_attention:
            hidden_states, encoder_hidden_states = img_attn_output, txt_attn_output
        else:
            hidden_states = gated(img_attn_output, img_gate1, hidden_states)
            encoder_hidden_states = gated(txt_attn_output, txt_gate1, encoder_hidden_states)

        img_shift2, img_scale2, img_gate2 = img_mod2.chunk(3, dim=-1)
        img_modulated2 = modulate(self.img_norm2, hidden_states, img_scale2, img_shift2, self.norm_kernel)
        hidden_states = gated_linear(self.img_mlp, img_modulated2, img_gate2, hidden_states)
        txt_shift2, txt_scale2, txt_gate2 = txt_mod2.chunk(3, dim=-1)
        txt_modulated2 = modulate(self.txt_norm2, encoder_hidden_states, txt_scale2, txt_shift2, self.norm_kernel)
        encoder_hidden_states = gated_linear(self.txt_mlp, txt_modulated2, txt_gate2, encoder_hidden_states)

        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


FUSED_BLOCKS = {}
if same_parameters(FluxTransformerBlock.forward, "self", "hidden_states", "encoder_hidden_states", "temb",
                   "image_rotary_emb", "joint_attention_kwargs"):
    FUSED_BLOCKS[FluxTransformerBlock] = FusedFluxTransformerBlock
if same_parameters(QwenImageTransformerBlock.forward, "self", "hidden_states", "encoder_hidden_states",
                   "encoder_hidden_states_mask", "temb", "image_rotary_emb", "joint_attention_kwargs", "modulate_index"):
    FUSED_BLOCKS[QwenImageTransformerBlock] = FusedQwenImageTransformerBlock


def install_fused_block(transformer: nn.Module, path: str) -> bool:
    """Once a double block's modulation linear (`path`: FLUX's transformer_blocks.3.norm1.linear, Qwen-Image's
    transformer_blocks.3.img_mod.1) is in place, swap the block for its fused subclass; False otherwise."""
    from pipeline.quantization import fused_norm

    parts = path.split(".")
    if not ENABLED or len(parts) <= 2:
        return False
    owner = transformer.get_submodule(".".join(parts[:-2]))
    fused = FUSED_BLOCKS.get(type(owner))
    if fused is None:
        return False
    owner.__class__ = fused
    if fused is FusedQwenImageTransformerBlock:
        owner.norm_kernel = fused_norm.ENABLED
    return True
