"""Double blocks with AdaLN-Zero's gated residual sums in the GEMM epilogues and their norms + modulation as one
kernel.

diffusers' blocks add each branch back as `hidden + gate · branch`: a product and a sum, two eager passes
over the (tokens x dim) activations after the GEMM that wrote the branch. A family's fused block (its
architecture's `Fusions.blocks`, in pipeline/families/) computes the gated sum in the epilogue of the branch's
last GEMM (attention's to_out / to_add_out, the MLP's fc2) with diffusers' roundings (the branch output, the
product and the sum, each rounded), and runs the norms the block modulates itself as one kernel each where the
norm fusion is on (fused_norm.py). The modules keep diffusers' paths and weights; only a block's class becomes
the subclass. Where the kernels don't run every step is diffusers' op, bit for bit. `SVDQ_FUSED_GATE=0` turns
it off.
"""

from __future__ import annotations

import os

from torch import nn

from pipeline.quantization.architecture import architecture_of

ENABLED = os.environ.get("SVDQ_FUSED_GATE", "1") != "0"


def install_fused_block(transformer: nn.Module, path: str) -> bool:
    """Once a block's modulation linear (`path`, e.g. transformer_blocks.3.norm1.linear or
    transformer_blocks.3.img_mod.1) is in place, swap the block for its family's fused subclass; False otherwise.
    A fused block class may define `on_fused(self)`, called after the swap."""
    parts = path.split(".")
    if not ENABLED or len(parts) <= 2:
        return False
    owner = transformer.get_submodule(".".join(parts[:-2]))
    fused = architecture_of(transformer).fusions().blocks.get(type(owner))
    if fused is None:
        return False
    owner.__class__ = fused
    if hasattr(owner, "on_fused"):
        owner.on_fused()
    return True
