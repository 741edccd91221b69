"""The two tensor-naming schemes of Nunchaku files, and the conversion between them.

Diffusers-style files name a tensor by its module path in the patched diffusers transformer and the fields
`proj_down`, `proj_up`, `smooth_factor`, `smooth_factor_orig`. Legacy files (an architecture may have such a
scheme: its `LegacyNames`, in the family's module) name the quantized layers per block, the fields `lora_down`,
`lora_up`, `smooth`, `smooth_orig`, and may rename other per-block tensors (DeepCompressor's writer,
`backend/nunchaku/convert.py`, lays them out; Nunchaku's loaders map them back). Everything the tables do not
name keeps diffusers' name in both schemes.
"""

from __future__ import annotations

import re

LEGACY_FIELDS = {"lora_down": "proj_down", "lora_up": "proj_up", "smooth": "smooth_factor",
                 "smooth_orig": "smooth_factor_orig"}
_INVERSE_FIELDS = {v: k for k, v in LEGACY_FIELDS.items()}


def _split(key: str) -> tuple[str, str]:
    module, _, fld = key.rpartition(".")
    return module, fld


class LegacyNames:
    """A legacy naming: per block stack (`transformer_blocks`), legacy module name -> diffusers module path."""

    def __init__(self, tables: dict[str, dict[str, str]]):
        self.tables = tables
        self.inverse = {stack: {v: k for k, v in table.items()} for stack, table in tables.items()}
        self.block = re.compile(rf"({'|'.join(map(re.escape, tables))})\.(\d+)\.(.+)$")

    def to_diffusers(self, key: str) -> str:
        """A legacy file's tensor name -> the name this project's modules use (identity for other names)."""
        module, fld = _split(key)
        m = self.block.match(module)
        if m:
            module = f"{m[1]}.{m[2]}.{self.tables[m[1]].get(m[3], m[3])}"
        return f"{module}.{LEGACY_FIELDS.get(fld, fld)}"

    def to_legacy(self, key: str) -> str:
        """A diffusers-style tensor name -> its legacy file name (identity where the schemes agree)."""
        module, fld = _split(key)
        m = self.block.match(module)
        renamed = m is not None and m[3] in self.inverse[m[1]]
        if renamed:
            module = f"{m[1]}.{m[2]}.{self.inverse[m[1]][m[3]]}"
        quantized_field = fld in _INVERSE_FIELDS and renamed
        return f"{module}.{_INVERSE_FIELDS[fld] if quantized_field else fld}"


def naming_of(keys) -> str:
    """'legacy' if the tensor names are a legacy scheme's (legacy field names), else 'diffusers'."""
    return "legacy" if any(k.endswith((".lora_down", ".smooth")) or ".qkv_proj." in k for k in keys) else "diffusers"
