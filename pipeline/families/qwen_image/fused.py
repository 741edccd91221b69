"""Qwen-Image's fused forwards: diffusers' Qwen-Image modules with the engine's fusions (pipeline/quantization/).

- FusedQKVQwenProcessor: diffusers' processor calls q, k and v one by one; this one runs the fused q/k/v layers
  and hands diffusers' code the chunks, with q/k norm + RoPE + concatenation as one kernel where it can
  (qwen_attention) and, given the block's gates and residuals, residual + gate · output in the projections'
  epilogues.
- FusedQwenImageTransformerBlock: the block with its gated residual sums in GEMM epilogues and, with
  norm_kernel, each norm + modulation as one kernel.

Each forward is diffusers' (0.42) with those steps fused; a diffusers whose forward takes other arguments keeps
its own. Where the kernels don't run, every step is diffusers' op, bit for bit.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import (QwenDoubleStreamAttnProcessor2_0,
                                                                 QwenImageTransformerBlock)
from torch import nn

from pipeline.quantization import fused_attention, fused_norm
from pipeline.quantization.architecture import Fusions
from pipeline.quantization.diffusers_compat import same_parameters
from pipeline.quantization.fused_norm import modulate
from pipeline.quantization.layers import gated, gated_linear

PROCESSOR_MATCHES = same_parameters(QwenDoubleStreamAttnProcessor2_0.__call__, "self", "attn", "hidden_states",
                                    "encoder_hidden_states", "encoder_hidden_states_mask", "attention_mask",
                                    "image_rotary_emb")
BLOCK_MATCHES = same_parameters(QwenImageTransformerBlock.forward, "self", "hidden_states", "encoder_hidden_states",
                                "encoder_hidden_states_mask", "temb", "image_rotary_emb", "joint_attention_kwargs",
                                "modulate_index")


def qwen_attention(processor: QwenDoubleStreamAttnProcessor2_0, attn, img: tuple, txt: tuple, hidden_states,
                   encoder_hidden_states, encoder_hidden_states_mask=None, attention_mask=None,
                   image_rotary_emb=None, gate=None, residual=None, context_gate=None, context_residual=None,
                   joint_value=None):
    """diffusers' Qwen-Image joint attention on projected q/k/v chunks (img, txt), with the q/k norms, RoPE and
    concatenation in one kernel [and each stream's residual + gate · output in its projection's epilogue];
    None where the kernel does not cover the call (the caller runs diffusers'). joint_value: both streams' v
    (B, text + image, inner), already joined (layers.joint_linear)."""
    if (attention_mask is not None or image_rotary_emb is None or processor._parallel_config is not None
            or attn.training):
        return None
    head_dim = attn.inner_dim // attn.heads
    norms = (attn.norm_added_q, attn.norm_added_k, attn.norm_q, attn.norm_k)
    spec = fused_attention.norm_args(norms, hidden_states.dtype, head_dim) if all(n is not None for n in norms) else None
    img_freqs, txt_freqs = image_rotary_emb
    if (spec is None or img_freqs.dim() != 2 or txt_freqs.dim() != 2
            or not fused_attention.runs_here(hidden_states, spec, True, attn.norm_q.weight)):
        return None
    from pipeline.kernels import ops

    # diffusers' QwenDoubleStreamAttnProcessor2_0, with the q/k preparation replaced
    if encoder_hidden_states_mask is not None:
        image_mask = torch.ones((hidden_states.shape[0], hidden_states.shape[1]), dtype=torch.bool,
                                device=hidden_states.device)
        attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
    seq_txt = encoder_hidden_states.shape[1]

    def heads(t):
        return t.unflatten(-1, (-1, head_dim))

    tables = [torch.view_as_real(f) for f in (txt_freqs, img_freqs)]  # (S, D/2, 2): cos, sin per pair
    joint_query, joint_key = ops.qk_norm_rope(
        [heads(txt[0]), heads(img[0])], [heads(txt[1]), heads(img[1])], [n.weight for n in norms[0::2]],
        [n.weight for n in norms[1::2]], [t[..., 0] for t in tables], [t[..., 1] for t in tables], spec[0], spec[1],
        True)
    joint_value = heads(joint_value) if joint_value is not None else torch.cat([heads(txt[2]), heads(img[2])], dim=1)
    joint_hidden_states = dispatch_attention_fn(
        joint_query, joint_key, joint_value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
        backend=processor._attention_backend, parallel_config=processor._parallel_config)
    joint_hidden_states = joint_hidden_states.flatten(2, 3)
    joint_hidden_states = joint_hidden_states.to(joint_query.dtype)
    txt_attn_output = joint_hidden_states[:, :seq_txt, :]
    img_attn_output = joint_hidden_states[:, seq_txt:, :]
    # to_out[1] is dropout, the identity outside training: the gated sums go in the projections' epilogues
    img_attn_output = gated_linear(attn.to_out[0], img_attn_output.contiguous(), gate, residual)
    txt_attn_output = gated_linear(attn.to_add_out, txt_attn_output.contiguous(), context_gate, context_residual)
    return img_attn_output, txt_attn_output


class _Projected:
    """What diffusers' Qwen-Image processor reads of `attn`, with q/k/v already computed."""

    def __init__(self, attn: nn.Module, img: tuple, txt: tuple):
        self.heads, self.inner_dim = attn.heads, attn.inner_dim
        self.norm_q, self.norm_k = attn.norm_q, attn.norm_k
        self.norm_added_q, self.norm_added_k = attn.norm_added_q, attn.norm_added_k
        self.to_out, self.to_add_out = attn.to_out, attn.to_add_out
        self.img, self.txt = img, txt

    def to_q(self, _):
        return self.img[0]

    def to_k(self, _):
        return self.img[1]

    def to_v(self, _):
        return self.img[2]

    def add_q_proj(self, _):
        return self.txt[0]

    def add_k_proj(self, _):
        return self.txt[1]

    def add_v_proj(self, _):
        return self.txt[2]


class FusedQKVQwenProcessor(QwenDoubleStreamAttnProcessor2_0):
    """Qwen-Image's diffusers processor, fed the q/k/v chunks of the fused layers; with fused_rope, q/k norm,
    RoPE and the concatenation run as one kernel where it can (qwen_attention)."""

    def __init__(self, fused_rope: bool = False):
        super().__init__()
        self.fused_rope = fused_rope

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None, gate=None, residual=None, context_gate=None,
                 context_residual=None):
        """(image, text) outputs; given gates and residuals (FusedQwenImageTransformerBlock), residual + gate · each."""
        projected = None  # v read from the joint projection, not concatenated
        if self.fused_rope:
            projected = fused_attention.joint_projections(attn, hidden_states, encoder_hidden_states)
        if projected is not None:
            txt, img, joint_value = projected
        else:
            img = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            txt = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            joint_value = None
        if self.fused_rope:
            out = qwen_attention(self, attn, img, txt, hidden_states, encoder_hidden_states,
                                                 encoder_hidden_states_mask, attention_mask, image_rotary_emb,
                                                 gate, residual, context_gate, context_residual, joint_value)
            if out is not None:
                return out
        img_out, txt_out = super().__call__(_Projected(attn, img, txt), hidden_states, encoder_hidden_states,
                                            encoder_hidden_states_mask, attention_mask, image_rotary_emb)
        return gated(img_out, gate, residual), gated(txt_out, context_gate, context_residual)

    def kernel_checks(self, attn, parent, ctx) -> list:
        """The kernel calls this processor makes for `attn` (kernels/selfcheck.py)."""
        projections = ctx.svdq(attn, "to_added_qkv", "to_qkv")
        outs = tuple(ctx.linear(m) for m in ctx.outputs(attn))
        norms = (attn.norm_added_q, attn.norm_added_k, attn.norm_q, attn.norm_k)
        head_dim = attn.inner_dim // attn.heads
        spec = (fused_attention.norm_args(norms, ctx.dtype, head_dim)
                if self.fused_rope and all(n is not None for n in norms) else None)
        checks = ctx.joint_or_plain(projections) if self.fused_rope else [ctx.linear(m) for m in projections]
        if spec is None:
            return checks + list(outs)
        checks.append(ctx.rope([norms[:2], norms[2:]], attn.heads, head_dim, spec, True, outs))
        gated = getattr(parent, "gates_in_epilogue", False)
        return checks + [ctx.linear(m, gated=gated) for m in ctx.outputs(attn)]


class FusedQwenImageTransformerBlock(QwenImageTransformerBlock):
    """diffusers' QwenImageTransformerBlock with its gated residual sums in the GEMMs' epilogues and, with
    norm_kernel, each norm + modulation as one kernel. Edit models' per-token modulation (modulate_index)
    and zero_cond_t run diffusers' forward."""

    norm_kernel = False

    gates_in_epilogue = True

    def on_fused(self) -> None:
        self.norm_kernel = fused_norm.ENABLED

    def kernel_norms(self) -> list:
        """The norms this block runs through the AdaLN kernel itself (kernels/selfcheck.py)."""
        return [self.img_norm1] if self.norm_kernel else []

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


def _qkv_attention(attn: nn.Module) -> bool:
    return isinstance(getattr(attn, "processor", None), QwenDoubleStreamAttnProcessor2_0)


def _qkv_installed(attn: nn.Module, ready: bool) -> None:
    if ready:
        attn.set_processor(FusedQKVQwenProcessor(fused_rope=fused_attention.ENABLED and PROCESSOR_MATCHES))


def fusions() -> Fusions:
    return Fusions(qkv_attention=_qkv_attention, qkv_installed=_qkv_installed,
                   blocks={QwenImageTransformerBlock: FusedQwenImageTransformerBlock} if BLOCK_MATCHES else {})
