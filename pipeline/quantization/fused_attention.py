"""The shared parts of attention whose q/k RMSNorm, rotary embedding and stream concatenation run as one kernel.

diffusers' dual-stream processors run the per-head RMSNorm, then RoPE as about eight fp32 elementwise ops,
then `torch.cat` of the two streams, each a separate pass over q and k. In eager mode that is about 94 GB of
memory traffic per FLUX.1-dev forward at 1024², more than all the GEMMs move (benchmarks/eager_traffic.py).
A family's fused processor (pipeline/families/) is diffusers' own with that middle part replaced by
`svdq::qk_norm_rope` (pipeline/kernels/triton_rope.py), where the Triton kernels run; elsewhere (the CPU
reference), or for anything the kernel does not cover (other norms, no rotary embedding, context
parallelism, training), it calls diffusers' code unchanged. Here: which norms the kernel reproduces
(norm_args), whether it runs for a call (runs_here), and both streams' q/k/v from one GEMM
(joint_projections: v, which needs no norm or rotation, is read from it instead of being concatenated).

The processors are installed with the fused q/k/v layers (fused_qkv.py); `SVDQ_FUSED_ROPE=0` keeps diffusers'
attention for a run.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from diffusers.models.normalization import RMSNorm
from torch import nn

from pipeline.quantization.layers import joint_linear

ENABLED = os.environ.get("SVDQ_FUSED_ROPE", "1") != "0"


def norm_args(norms: tuple, dtype: torch.dtype, head_dim: int) -> Optional[tuple[float, bool]]:
    """(eps, round_normed) when every norm is a per-head RMSNorm of one kind the kernel reproduces, with one
    eps and weights in the activations' dtype (or none); None otherwise (diffusers' code runs)."""
    kinds = {type(n) for n in norms}
    if kinds == {nn.RMSNorm}:  # torch's (FLUX): one rounding after the weight
        ok = all(tuple(n.normalized_shape) == (head_dim,) for n in norms)
        round_normed = False
    elif kinds == {RMSNorm}:  # diffusers' (Qwen-Image): rounded before its weight too
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


def runs_here(x: torch.Tensor, spec: tuple[float, bool], paired: bool, weight: Optional[torch.Tensor]) -> bool:
    """Whether the q/k kernel runs for this call (norm_args' spec, table kind, norm weights or none)."""
    from pipeline.kernels.dispatch import plain_kernels, rope_config

    return plain_kernels(x.device, rope_config(spec[1], paired, weight is not None, x.dtype))
