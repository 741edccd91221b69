"""Run a quantized q/k/v target as one layer: the input is quantized once and one GEMM runs.

A checkpoint holds q, k and v fused (Nunchaku's `to_qkv`); diffusers' attention may call them one by
one, which would quantize the same input three times and run three narrow GEMMs. Where a family says its
attention can run the fused layers (its architecture's `Fusions.qkv_attention`), the fused layer is set on
the attention whole (`to_qkv`, `to_added_qkv` for the text stream) and the family's hook
(`Fusions.qkv_installed`) gives it a processor that runs them; elsewhere the layer is split into row slices.
"""

from __future__ import annotations

from torch import nn

from pipeline.quantization.architecture import architecture_of

FUSED_NAMES = {("to_q", "to_k", "to_v"): "to_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"): "to_added_qkv"}
ENABLED = True  # False keeps the row slices (the tests compare both)


def install_fused_qkv(transformer: nn.Module, parts: tuple[str, ...], layer: nn.Module) -> bool:
    """Put a q/k/v target's layer whole on the attention that owns `parts`, if it can run it so;
    False leaves it to the caller (row slices)."""
    owners = {p.rpartition(".")[0] for p in parts}
    leaves = tuple(p.rpartition(".")[2] for p in parts)
    if not ENABLED or len(owners) != 1 or leaves not in FUSED_NAMES:
        return False
    fusions = architecture_of(transformer).fusions()
    attn = transformer.get_submodule(owners.pop())
    if fusions.qkv_attention is None or not fusions.qkv_attention(attn):
        return False
    setattr(attn, FUSED_NAMES[leaves], layer)
    for leaf in leaves:
        delattr(attn, leaf)  # their weights live in the fused layer now
    # both streams must be fused before the fused path may run
    ready = hasattr(attn, "to_qkv") and (getattr(attn, "added_kv_proj_dim", None) is None
                                         or hasattr(attn, "to_added_qkv"))
    if fusions.qkv_installed is not None:
        fusions.qkv_installed(attn, ready)
    return True
