"""Z-Image's SVDQuant targets and file conventions, as Nunchaku's Z-Image files hold them.

Checked against Nunchaku's loader (nunchaku/models/transformers/transformer_zimage.py and merge_safetensors.py,
main at 3a3cc3d): `NunchakuZImageTransformer2DModel._patch_model` replaces, in every block of `layers` and (unless
the file's quantization_config says `skip_refiners`) of `noise_refiner` and `context_refiner`:
- the attention's to_q, to_k, to_v by one W4A4 layer `attention.to_qkv` (rows q, k, v) and `attention.to_out.0`
  by a W4A4 layer;
- Z-Image's FeedForward (w2(silu(w1 x) * w3 x)) by diffusers' FeedForward with a SwiGLU, whose two W4A4 layers
  are `feed_forward.net.0.proj` and `feed_forward.net.2`. diffusers' SwiGLU multiplies the first half of
  net.0.proj's output by silu of the second, so that layer's rows are w3 then w1; net.2 is w2.
Every W4A4 layer takes signed activations (SVDQW4A4Linear's default: silu(w1 x) * w3 x has either sign). Nothing
else is quantized: the AdaLN modulation (`adaLN_modulation.0`) stays 16-bit (no AWQ layer in Z-Image files), as do
the embedders, norms and final layer. Z-Image's linears have no bias, and Nunchaku builds its layers without one
and loads the file strictly, so no `.bias` is written for them (Architecture.zero_bias=False).

Files use the module paths of Nunchaku's patched model (diffusers' paths, with to_qkv and the SwiGLU's names);
`model_class` is NunchakuZImageTransformer2DModel (the class merge_safetensors.py is given for Z-Image). Our files
quantize the refiners (what Nunchaku's loader assumes when quantization_config has no `skip_refiners`, as ours has
not); a file made with skip_refiners=true holds its refiners' feed-forwards as 16-bit `net.0.proj`/`net.2`
weights, which this reader does not take apart into w3/w1: it stops naming the missing refiner tensor.
"""

from __future__ import annotations

from torch import nn

from pipeline.quantization.targets import Target, qkv

# The block lists in the order Z-Image's forward runs them (noise_refiner on the image tokens, context_refiner on
# the caption's, then the joint layers); both refiners count n_refiner_layers blocks.
BLOCK_STACKS = {"noise_refiner": "n_refiner_layers", "context_refiner": "n_refiner_layers", "layers": "n_layers"}
MODEL_CLASS = "NunchakuZImageTransformer2DModel"


def block_targets(p: str) -> list[Target]:
    """One Z-Image block's four W4A4 layers under Nunchaku's names (prefix `p`: "layers.3.")."""
    return [qkv(p, "attention.to_qkv", "attention.to_q", "attention.to_k", "attention.to_v"),
            Target(f"{p}attention.to_out.0", (f"{p}attention.to_out.0",)),
            # SwiGLU: value rows (w3) first, gate rows (w1) second
            Target(f"{p}feed_forward.net.0.proj", (f"{p}feed_forward.w3", f"{p}feed_forward.w1")),
            Target(f"{p}feed_forward.net.2", (f"{p}feed_forward.w2",))]


def z_image_targets(transformer: nn.Module) -> list[Target]:
    out: list[Target] = []
    for stack in BLOCK_STACKS:
        for i, _ in enumerate(getattr(transformer, stack)):
            out += block_targets(f"{stack}.{i}.")
    return out


def owns_keys(keys: list[str]) -> bool:
    """A Z-Image file: it has the refiner blocks or the caption embedder (no other architecture here does)."""
    return any(k.startswith(("noise_refiner.", "context_refiner.", "cap_embedder.")) for k in keys)
