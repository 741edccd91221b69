"""Z-Image's fused q/k/v: diffusers' Z-Image attention processor running the one fused `to_qkv` layer.

diffusers' ZSingleStreamAttnProcessor calls to_q, to_k and to_v one by one; with the file's fused layer split into
row slices each would quantize the same input again and run a narrow GEMM. FusedQKVZImageProcessor runs `to_qkv`
once and hands diffusers' own code the three chunks (norms, RoPE, attention and output projection unchanged), so
its output is diffusers' with q/k/v computed by the fused layer.

The SwiGLU's fused `feed_forward.net.0.proj` is placed as two row slices (w3, w1) of one layer: the engine's
fused MLP kernel is GELU's, and the slices give the fused layer's rows exactly (their input is quantized twice).
"""

from __future__ import annotations

from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor
from torch import nn

from pipeline.quantization.architecture import Fusions
from pipeline.quantization.diffusers_compat import same_parameters

PROCESSOR_MATCHES = same_parameters(ZSingleStreamAttnProcessor.__call__, "self", "attn", "hidden_states",
                                    "encoder_hidden_states", "attention_mask", "freqs_cis")


class _Projected:
    """What diffusers' Z-Image processor reads of `attn`, with q/k/v already computed."""

    def __init__(self, attn: nn.Module, q, k, v):
        self.heads, self.norm_q, self.norm_k, self.to_out = attn.heads, attn.norm_q, attn.norm_k, attn.to_out
        self.q, self.k, self.v = q, k, v

    def to_q(self, _):
        return self.q

    def to_k(self, _):
        return self.k

    def to_v(self, _):
        return self.v


class FusedQKVZImageProcessor(ZSingleStreamAttnProcessor):
    """diffusers' Z-Image processor fed the q/k/v chunks of the fused layer."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return super().__call__(_Projected(attn, q, k, v), hidden_states, encoder_hidden_states, attention_mask,
                                freqs_cis)


def _qkv_attention(attn: nn.Module) -> bool:
    return PROCESSOR_MATCHES and type(getattr(attn, "processor", None)) is ZSingleStreamAttnProcessor


def _qkv_installed(attn: nn.Module, ready: bool) -> None:
    if ready:
        attn.set_processor(FusedQKVZImageProcessor())


def fusions() -> Fusions:
    return Fusions(qkv_attention=_qkv_attention, qkv_installed=_qkv_installed)
