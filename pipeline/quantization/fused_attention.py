"""Attention whose q/k RMSNorm, rotary embedding and text+image concatenation run as one kernel.

diffusers' FLUX and Qwen-Image processors run the per-head RMSNorm, then RoPE as about eight fp32
elementwise ops, then `torch.cat` of the two streams, each a separate pass over q and k. In eager mode
that is about 94 GB of memory traffic per FLUX.1-dev forward at 1024², more than all the GEMMs move
(benchmarks/eager_traffic.py). The processors here are diffusers' own with that middle part replaced by
`svdq::qk_norm_rope` (pipeline/kernels/triton_rope.py), where the Triton kernels run. Elsewhere (the CPU
reference), or for anything the kernel does not cover (other norms, no rotary embedding, context
parallelism, training), they call diffusers' code unchanged. Given a double block's gates and residuals
(fused_block.py), they return residual + gate · output, computed in the output projections' epilogues.
In a double block the two streams' q/k/v GEMMs write into one joint tensor (layers.joint_linear), so v,
which needs no norm or rotation, is read from it instead of being concatenated.

They are installed with the fused q/k/v layers (fused_qkv.py); `SVDQ_FUSED_ROPE=0` keeps diffusers'
attention for a run. The code after the attention is diffusers' (0.42); a diffusers whose processor takes
other arguments keeps its own.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
from torch import nn

from pipeline.quantization.diffusers_compat import same_parameters
from pipeline.quantization.layers import gated, gated_linear, joint_linear

ENABLED = os.environ.get("SVDQ_FUSED_ROPE", "1") != "0"


FLUX_MATCHES = same_parameters(FluxAttnProcessor.__call__, "self", "attn", "hidden_states", "encoder_hidden_states",
                               "attention_mask", "image_rotary_emb")
QWEN_MATCHES = same_parameters(QwenDoubleStreamAttnProcessor2_0.__call__, "self", "attn", "hidden_states",
                               "encoder_hidden_states", "encoder_hidden_states_mask", "attention_mask",
                               "image_rotary_emb")


def norm_args(norms: tuple, dtype: torch.dtype, head_dim: int) -> Optional[tuple[float, bool]]:
    """(eps, round_normed) when every norm is a per-head RMSNorm of one kind the kernel reproduces, with one
    eps and weights in the activations' dtype (or none); None otherwise (diffusers' code runs)."""
    kinds = {type(n) for n in norms}
    if kinds == {nn.RMSNorm}:  # FLUX: torch's, one rounding after the weight
        ok = all(tuple(n.normalized_shape) == (head_dim,) for n in norms)
        round_normed = False
    elif kinds == {RMSNorm}:  # Qwen-Image: diffusers', rounded before its weight too
        ok = all(tuple(n.dim) == (head_dim,) and getattr(n, "bias", None) is None for n in norms)
        round_normed = True
    else:
        return None
    weights = [n.weight for n in norms]
    has = {w is not None for w in weights}
    if not ok or len(has) != 1 or any(w is not None and w.dtype != dtype for w in weights):
        return None
    eps = {n.eps for n in norms}
    if len(eps) != 1:
        return None
    value = eps.pop()
    return (torch.finfo(dtype).eps if value is None else float(value)), round_normed


def joint_projections(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor):
    """Both streams' q/k/v written into one (B, text + image, 3·inner) tensor (layers.joint_linear): (the text's
    q, k, v, the image's q, k, v, both streams' v joined), views of it; None where that does not run (the caller
    projects each stream)."""
    qkv = joint_linear((attn.to_added_qkv, attn.to_qkv), (encoder_hidden_states, hidden_states))
    if qkv is None:
        return None
    text = encoder_hidden_states.shape[1]
    return qkv[:, :text].chunk(3, dim=-1), qkv[:, text:].chunk(3, dim=-1), qkv.chunk(3, dim=-1)[2]


def _runs_here(x: torch.Tensor, spec: tuple[float, bool], paired: bool, weight: Optional[torch.Tensor]) -> bool:
    """Whether the q/k kernel runs for this call (norm_args' spec, table kind, norm weights or none)."""
    from pipeline.kernels.dispatch import plain_kernels, rope_config

    return plain_kernels(x.device, rope_config(spec[1], paired, weight is not None, x.dtype))


class FusedRopeFluxAttnProcessor(FluxAttnProcessor):
    """diffusers' FluxAttnProcessor with q/k norm + RoPE + the text/image concatenation in one kernel.

    Given `gate` and `residual` (and `context_gate`, `context_residual` for the text stream), a double block's
    outputs come back as residual + gate · to_out(attention), the gated sum in to_out's GEMM epilogue
    (fused_block.py); without them, as diffusers returns them."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 gate=None, residual=None, context_gate=None, context_residual=None):
        joint = attn.added_kv_proj_dim is not None
        norms = (attn.norm_q, attn.norm_k) + ((attn.norm_added_q, attn.norm_added_k) if joint else ())
        spec = norm_args(norms, hidden_states.dtype, attn.head_dim)
        if (spec is None or image_rotary_emb is None or self._parallel_config is not None or attn.training
                or not _runs_here(hidden_states, spec, False, attn.norm_q.weight)):
            out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            if encoder_hidden_states is None:
                return out
            return gated(out[0], gate, residual), gated(out[1], context_gate, context_residual)
        from pipeline.kernels import ops

        projected = None  # v read from the joint projection, not concatenated
        if joint and getattr(attn, "fused_projections", False):
            projected = joint_projections(attn, hidden_states, encoder_hidden_states)
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
    spec = norm_args(norms, hidden_states.dtype, head_dim) if all(n is not None for n in norms) else None
    img_freqs, txt_freqs = image_rotary_emb
    if (spec is None or img_freqs.dim() != 2 or txt_freqs.dim() != 2
            or not _runs_here(hidden_states, spec, True, attn.norm_q.weight)):
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


def install_flux(attn: nn.Module) -> bool:
    """Give a FLUX attention running fused q/k/v the fused-RoPE processor (if it has diffusers' default one)."""
    if not (ENABLED and FLUX_MATCHES and type(attn.processor) is FluxAttnProcessor):
        return False
    attn.set_processor(FusedRopeFluxAttnProcessor())
    return True
