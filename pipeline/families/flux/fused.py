"""FLUX.1's fused forwards: diffusers' FLUX modules with the engine's fusions (pipeline/quantization/fused_*.py).

- FusedRopeFluxAttnProcessor: q/k norm + RoPE + the text/image concatenation in one kernel; given a double
  block's gates and residuals, residual + gate · output in the output projections' epilogues.
- FusedFluxTransformerBlock: the double block with its gated residual sums in GEMM epilogues.
- FusedMLPFluxSingleTransformerBlock: the single block's MLP as a fused pair into proj_out's second half.

Each forward is diffusers' (0.42) with those steps fused; a diffusers whose forward takes other arguments keeps
its own. Where the kernels don't run, every step is diffusers' op, bit for bit.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_flux import (FluxAttention, FluxAttnProcessor, FluxSingleTransformerBlock,
                                                            FluxTransformerBlock, _get_qkv_projections)
from torch import nn

from pipeline.quantization import fused_attention, fused_block, fused_mlp
from pipeline.quantization.architecture import Fusions
from pipeline.quantization.diffusers_compat import same_parameters
from pipeline.quantization.fused_mlp import gelu_mlp, gelu_tanh
from pipeline.quantization.fused_norm import FusedAdaLayerNormZero, modulate
from pipeline.quantization.layers import SplitInputLinear, gated, gated_linear, is_int4_w4a4

PROCESSOR_MATCHES = same_parameters(FluxAttnProcessor.__call__, "self", "attn", "hidden_states",
                                    "encoder_hidden_states", "attention_mask", "image_rotary_emb")
BLOCK_MATCHES = same_parameters(FluxTransformerBlock.forward, "self", "hidden_states", "encoder_hidden_states", "temb",
                                "image_rotary_emb", "joint_attention_kwargs")


class FusedRopeFluxAttnProcessor(FluxAttnProcessor):
    """diffusers' FluxAttnProcessor with q/k norm + RoPE + the text/image concatenation in one kernel.

    Given `gate` and `residual` (and `context_gate`, `context_residual` for the text stream), a double block's
    outputs come back as residual + gate · to_out(attention), the gated sum in to_out's GEMM epilogue
    (FusedFluxTransformerBlock); without them, as diffusers returns them."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 gate=None, residual=None, context_gate=None, context_residual=None):
        joint = attn.added_kv_proj_dim is not None
        norms = (attn.norm_q, attn.norm_k) + ((attn.norm_added_q, attn.norm_added_k) if joint else ())
        spec = fused_attention.norm_args(norms, hidden_states.dtype, attn.head_dim)
        if (spec is None or image_rotary_emb is None or self._parallel_config is not None or attn.training
                or not fused_attention.runs_here(hidden_states, spec, False, attn.norm_q.weight)):
            out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            if encoder_hidden_states is None:
                return out
            return gated(out[0], gate, residual), gated(out[1], context_gate, context_residual)
        from pipeline.kernels import ops

        projected = None  # v read from the joint projection, not concatenated
        if joint and getattr(attn, "fused_projections", False):
            projected = fused_attention.joint_projections(attn, hidden_states, encoder_hidden_states)
        if projected is not None:
            (encoder_query, encoder_key, _), (query, key, _), value = projected
        else:
            query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
                attn, hidden_states, encoder_hidden_states)

        def heads(t):
            return t.unflatten(-1, (-1, attn.head_dim))

        qs, ks, wqs, wks = [heads(query)], [heads(key)], [attn.norm_q.weight], [attn.norm_k.weight]
        value = heads(value)
        if joint:  # text first, as diffusers concatenates
            qs.insert(0, heads(encoder_query))
            ks.insert(0, heads(encoder_key))
            wqs.insert(0, attn.norm_added_q.weight)
            wks.insert(0, attn.norm_added_k.weight)
            if projected is None:
                value = torch.cat([heads(encoder_value), value], dim=1)
        cos, sin = image_rotary_emb  # over the joint sequence, one value per element
        query, key = ops.qk_norm_rope(qs, ks, wqs, wks, [cos], [sin], spec[0], spec[1], False)

        # diffusers' FluxAttnProcessor from here on
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                              backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            # to_out[1] is dropout, the identity outside training: the gated sum goes in to_out[0]'s epilogue
            hidden_states = gated_linear(attn.to_out[0], hidden_states.contiguous(), gate, residual)
            encoder_hidden_states = gated_linear(attn.to_add_out, encoder_hidden_states.contiguous(), context_gate,
                                                 context_residual)
            return hidden_states, encoder_hidden_states
        return hidden_states

    def kernel_checks(self, attn, parent, ctx) -> list:
        """The kernel calls this processor makes for `attn` (kernels/selfcheck.py)."""
        joint = attn.added_kv_proj_dim is not None
        norms = (attn.norm_q, attn.norm_k) + ((attn.norm_added_q, attn.norm_added_k) if joint else ())
        projections = ctx.svdq(attn, "to_added_qkv", "to_qkv", "add_q_proj", "add_k_proj", "add_v_proj", "to_q",
                               "to_k", "to_v")
        unfused = tuple(ctx.linear(m) for m in projections + ctx.outputs(attn))
        spec = fused_attention.norm_args(norms, ctx.dtype, attn.head_dim)
        if spec is None:
            return list(unfused)
        streams = [(attn.norm_added_q, attn.norm_added_k)] if joint else []
        checks = [ctx.rope(streams + [(attn.norm_q, attn.norm_k)], attn.heads, attn.head_dim, spec, False, unfused)]
        if joint and getattr(attn, "fused_projections", False):
            checks += ctx.joint_or_plain(ctx.svdq(attn, "to_added_qkv", "to_qkv"))
        else:
            checks += [ctx.linear(m) for m in projections]
        gated = getattr(parent, "gates_in_epilogue", False)
        return checks + [ctx.linear(m, gated=gated) for m in ctx.outputs(attn)]


class FusedFluxTransformerBlock(FluxTransformerBlock):
    """diffusers' FluxTransformerBlock with its gated residual sums in the GEMMs' epilogues."""

    gates_in_epilogue = True

    def kernel_norms(self) -> list:
        """The norms this block runs through the AdaLN kernel itself (kernels/selfcheck.py)."""
        return [self.norm2] if isinstance(self.norm1, FusedAdaLayerNormZero) else []

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


class FusedMLPFluxSingleTransformerBlock(FluxSingleTransformerBlock):
    """FLUX's single block with its MLP run as a fused pair into proj_out's second half, which adds the
    first half's output (the attention's) in its epilogue: no concatenation, no separate GELU. With
    gate_in_epilogue, that epilogue also computes the gated residual sum. The text and image streams it is
    given are joined without a copy where they are the previous single block's output (joined)."""

    gate_in_epilogue = False

    def on_fused(self) -> None:
        self.gate_in_epilogue = fused_block.ENABLED

    def kernel_checks(self, parent, ctx) -> list:
        """The fused MLP's kernel calls (kernels/selfcheck.py)."""
        fc1, fc2, gated = self.proj_mlp, self.proj_out.second, self.gate_in_epilogue
        return [ctx.gelu_mlp(fc1, fc2, True, gated, (ctx.linear(fc1), ctx.linear(fc2, residual=True, gated=gated)))]

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                joint_attention_kwargs: Optional[dict[str, Any]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        # diffusers' FluxSingleTransformerBlock.forward, with the MLP and proj_out as above
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = fused_mlp.joined(encoder_hidden_states, hidden_states)  # the previous block's output: no copy
        residual = hidden_states
        norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
        attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                                **(joint_attention_kwargs or {}))
        first = self.proj_out.first(attn_output)
        if self.gate_in_epilogue:  # residual + gate · proj_out(...) in proj_out's second GEMM
            hidden_states = gelu_mlp(norm_hidden_states, self.proj_mlp, self.proj_out.second, residual=first,
                                     gate=gate, gated_residual=residual)
        else:
            projected = gelu_mlp(norm_hidden_states, self.proj_mlp, self.proj_out.second, residual=first)
            hidden_states = gated(projected, gate, residual)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


# The single block's forward is rewritten here from diffusers' (0.42); a diffusers whose forward takes
# other arguments keeps its own (unfused) forward rather than lose what changed.
_SINGLE_BLOCK_MATCHES = same_parameters(FluxSingleTransformerBlock.forward, "self", "hidden_states",
                                        "encoder_hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs")


# The single block's forward is rewritten here from diffusers' (0.42); a diffusers whose forward takes
# other arguments keeps its own (unfused) forward rather than lose what changed.
SINGLE_BLOCK_MATCHES = same_parameters(FluxSingleTransformerBlock.forward, "self", "hidden_states",
                                       "encoder_hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs")


def single_block_fusable(owner: nn.Module) -> bool:
    """The single block's MLP can run as a fused pair: GELU tanh, INT4 W4A4 proj_mlp and proj_out's MLP half."""
    out = owner.proj_out
    return (SINGLE_BLOCK_MATCHES and gelu_tanh(owner.act_mlp) and is_int4_w4a4(owner.proj_mlp)
            and isinstance(out, SplitInputLinear) and is_int4_w4a4(out.second)
            and out.second.in_features == owner.proj_mlp.out_features)


def _qkv_attention(attn: nn.Module) -> bool:
    return isinstance(attn, FluxAttention)


def _qkv_installed(attn: nn.Module, ready: bool) -> None:
    """diffusers' own fused path (`fused_projections`) once every stream is fused; then q/k norm + RoPE as one
    kernel (if the attention has diffusers' default processor)."""
    attn.fused_projections = ready
    if (ready and fused_attention.ENABLED and PROCESSOR_MATCHES
            and type(attn.processor) is FluxAttnProcessor):
        attn.set_processor(FusedRopeFluxAttnProcessor())


def fusions() -> Fusions:
    return Fusions(qkv_attention=_qkv_attention, qkv_installed=_qkv_installed,
                   blocks={FluxTransformerBlock: FusedFluxTransformerBlock} if BLOCK_MATCHES else {},
                   mlp_owners={FluxSingleTransformerBlock: (FusedMLPFluxSingleTransformerBlock, single_block_fusable)})
