"""The two tensor-naming schemes of Nunchaku files, and the conversion between them.

Diffusers-style files (Qwen-Image; this project's older FLUX files) name a tensor by its module path in the
patched diffusers transformer and the fields `proj_down`, `proj_up`, `smooth_factor`, `smooth_factor_orig`.
Legacy files (every FLUX file Nunchaku publishes, and the only FLUX naming its loaders read) name the
quantized layers per block (`qkv_proj`, `out_proj`, `mlp_fc1`, ...), the fields `lora_down`, `lora_up`,
`smooth`, `smooth_orig`, and keep the per-head q/k RMSNorm weights without the `attn.` segment
(`transformer_blocks.N.norm_q.weight`), as DeepCompressor's writer (`backend/nunchaku/convert.py`) lays them
out and Nunchaku's `convert_flux_state_dict` (transformer_flux_v2.py) maps them back. Everything else keeps
diffusers' names in both schemes.
"""

from __future__ import annotations

import re

LEGACY_FIELDS = {"lora_down": "proj_down", "lora_up": "proj_up", "smooth": "smooth_factor",
                 "smooth_orig": "smooth_factor_orig"}
_NORMS = {"norm_q": "attn.norm_q", "norm_k": "attn.norm_k"}
LEGACY_DOUBLE = {"qkv_proj": "attn.to_qkv", "qkv_proj_context": "attn.add_qkv_proj", "out_proj": "attn.to_out.0",
                 "out_proj_context": "attn.to_add_out", "mlp_fc1": "ff.net.0.proj", "mlp_fc2": "ff.net.2",
                 "mlp_context_fc1": "ff_context.net.0.proj", "mlp_context_fc2": "ff_context.net.2",
                 **_NORMS, "norm_added_q": "attn.norm_added_q", "norm_added_k": "attn.norm_added_k"}
LEGACY_SINGLE = {"qkv_proj": "attn.to_qkv", "out_proj": "attn.to_out", "mlp_fc1": "mlp_fc1", "mlp_fc2": "mlp_fc2",
                 **_NORMS}
_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_TABLES = {"transformer_blocks": LEGACY_DOUBLE, "single_transformer_blocks": LEGACY_SINGLE}
_INVERSE = {kind: {v: k for k, v in table.items()} for kind, table in _TABLES.items()}
_INVERSE_FIELDS = {v: k for k, v in LEGACY_FIELDS.items()}


def _split(key: str) -> tuple[str, str]:
    module, _, fld = key.rpartition(".")
    return module, fld


def to_diffusers(key: str) -> str:
    """A legacy file's tensor name -> the name this project's modules use (identity for other names)."""
    module, fld = _split(key)
    m = _BLOCK.match(module)
    if m:
        module = f"{m[1]}.{m[2]}.{_TABLES[m[1]].get(m[3], m[3])}"
    return f"{module}.{LEGACY_FIELDS.get(fld, fld)}"


def to_legacy(key: str) -> str:
    """A diffusers-style tensor name -> its legacy FLUX file name (identity where the schemes agree)."""
    module, fld = _split(key)
    m = _BLOCK.match(module)
    renamed = m is not None and m[3] in _INVERSE[m[1]]
    if renamed:
        module = f"{m[1]}.{m[2]}.{_INVERSE[m[1]][m[3]]}"
    quantized_field = fld in _INVERSE_FIELDS and renamed
    return f"{module}.{_INVERSE_FIELDS[fld] if quantized_field else fld}"


def naming_of(keys) -> str:
    """'legacy' if the tensor names are the legacy FLUX scheme's, else 'diffusers'."""
    return "legacy" if any(k.endswith((".lora_down", ".smooth")) or ".qkv_proj." in k for k in keys) else "diffusers"
