"""Run a quantized q/k/v target as one layer: the input is quantized once and one GEMM runs.

A checkpoint holds q, k and v fused (Nunchaku's `to_qkv`); diffusers' attention may call them one by
one, which would quantize the same input three times and run three narrow GEMMs. FLUX's attention
has a fused path of its own (`fused_projections`, `to_qkv` / `to_added_qkv`). Qwen-Image's processor
calls q, k and v one by one, so it gets a processor that runs the fused layers and hands diffusers'
processor the three chunks. Both also get their q/k norm, RoPE and stream concatenation as one kernel
where the Triton kernels run (fused_attention.py).
"""

from __future__ import annotations

from diffusers.models.transformers.transformer_flux import FluxAttention
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
from torch import nn

from pipeline.quantization import fused_attention
from pipeline.quantization.layers import gated

FUSED_NAMES = {("to_q", "to_k", "to_v"): "to_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"): "to_added_qkv"}


def _flux(attn: nn.Module) -> bool:
    return isinstance(attn, FluxAttention)


def _qwen(attn: nn.Module) -> bool:
    return isinstance(getattr(attn, "processor", None), QwenDoubleStreamAttnProcessor2_0)


# Attention kinds that can run fused layers; set empty to keep the row slices (the tests compare both).
FUSED_ATTENTION = {"flux": _flux, "qwen-image": _qwen}


def install_fused_qkv(transformer: nn.Module, parts: tuple[str, ...], layer: nn.Module) -> bool:
    """Put a q/k/v target's layer whole on the attention that owns `parts`, if it can run it so;
    False leaves it to the caller (row slices)."""
    owners = {p.rpartition(".")[0] for p in parts}
    leaves = tuple(p.rpartition(".")[2] for p in parts)
    if len(owners) != 1 or leaves not in FUSED_NAMES:
        return False
    attn = transformer.get_submodule(owners.pop())
    kind = next((k for k, test in FUSED_ATTENTION.items() if test(attn)), None)
    if kind is None:
        return False
    setattr(attn, FUSED_NAMES[leaves], layer)
    for leaf in leaves:
        delattr(attn, leaf)  # their weights live in the fused layer now
    # both streams must be fused before the fused path may run
    ready = hasattr(attn, "to_qkv") and (getattr(attn, "added_kv_proj_dim", None) is None
                                         or hasattr(attn, "to_added_qkv"))
    if kind == "flux":
        attn.fused_projections = ready
        if ready:
            fused_attention.install_flux(attn)
    elif ready:
        attn.set_processor(FusedQKVQwenProcessor(fused_rope=fused_attention.ENABLED and fused_attention.QWEN_MATCHES))
    return True


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
    RoPE and the concatenation run as one kernel where it can (fused_attention.qwen_attention)."""

    def __init__(self, fused_rope: bool = False):
        super().__init__()
        self.fused_rope = fused_rope

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None, gate=None, residual=None, context_gate=None,
                 context_residual=None):
        """(image, text) outputs; given gates and residuals (fused_block.py), residual + gate · each."""
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
            out = fused_attention.qwen_attention(self, attn, img, txt, hidden_states, encoder_hidden_states,
                                                 encoder_hidden_states_mask, attention_mask, image_rotary_emb,
                                                 gate, residual, context_gate, context_residual, joint_value)
            if out is not None:
                return out
        img_out, txt_out = super().__call__(_Projected(attn, img, txt), hidden_states, encoder_hidden_states,
                                            encoder_hidden_states_mask, attention_mask, image_rotary_emb)
        return gated(img_out, gate, residual), gated(txt_out, context_gate, context_residual)
