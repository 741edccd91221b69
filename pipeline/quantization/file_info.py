"""What an svdq-*.safetensors file is, read from its header and metadata alone (no tensor is loaded).

A merged Nunchaku file carries string metadata: `config` (the diffusers transformer config JSON, from which
Nunchaku's v2 loaders build the model on the meta device), `quantization_config` (method, weight/activation
dtype, scale dtype, group size, usually `rank`), `model_class` and `comfy_config`. Precision and rank are also
visible in the tensors themselves (fp8 group scales mean NVFP4; the low-rank width is the rank), so a run can
check the file's name, its metadata and its tensors against each other before anything is loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.errors import QuantizationError
from pipeline.quantization.architecture import architecture_of_file, architectures
from pipeline.quantization.file_names import naming_of

# config keys that fix the transformer's tensor shapes (diffusers' names, whatever the family; some transformers'
# configs have their own: dim, n_layers, n_refiner_layers, n_heads, cap_feat_dim, all_patch_size, ...)
SHAPE_KEYS = ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
              "pooled_projection_dim", "in_channels", "out_channels", "patch_size", "guidance_embeds",
              "dim", "n_layers", "n_refiner_layers", "n_heads", "qk_norm", "cap_feat_dim", "siglip_feat_dim",
              "all_patch_size", "all_f_patch_size")


def quantization_config(precision: str, rank: int) -> dict[str, Any]:
    """The `quantization_config` metadata as Nunchaku's merge script (nunchaku/merge_safetensors.py) writes it."""
    fp4 = precision == "nvfp4"
    return {
        "method": "svdquant",
        "weight": {"dtype": "fp4_e2m1_all" if fp4 else "int4", "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None,
                   "group_size": 16 if fp4 else 64},
        "activation": {"dtype": "fp4_e2m1_all" if fp4 else "int4", "scale_dtype": "fp8_e4m3_nan" if fp4 else None,
                       "group_size": 16 if fp4 else 64},
        "rank": rank,
    }


def family_of_class(model_class: Optional[str]) -> Optional[str]:
    """The architecture a `model_class` metadata string names (None if none here does)."""
    arch = architecture_of_file([], model_class) if model_class else None
    return arch.name if arch else None


@dataclass
class CheckpointInfo:
    """One file as its header describes it; `problems` lists what disagrees within the file."""

    path: str
    precision: str
    rank: int
    naming: str  # legacy (per-block names) | diffusers
    family: Optional[str]
    model_class: Optional[str]
    act_unsigned: Optional[bool]
    metadata_precision: Optional[str] = None
    metadata_rank: Optional[int] = None
    config: Optional[dict[str, Any]] = None
    metadata_keys: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    w4a4_layers: int = 0
    awq_layers: int = 0
    blocks: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def open_safetensors(path: Path):
    from safetensors import safe_open

    if not path.is_file():
        raise QuantizationError(f"quantization.path={path}: no such file. Point it at an svdq-*.safetensors file.")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for truncated/invalid files
        raise QuantizationError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def _json(text: Optional[str], what: str, problems: list[str]) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        problems.append(f"metadata '{what}' is not valid JSON ({e})")
        return {}
    return value if isinstance(value, dict) else {}


def _family_from_keys(keys: list[str]) -> Optional[str]:
    arch = architecture_of_file(keys, None)
    return arch.name if arch else None


def _metadata_precision(qc: dict) -> Optional[str]:
    dtype = (qc.get("weight") or {}).get("dtype")
    if not dtype:
        return None
    return "nvfp4" if "fp4" in str(dtype) else "int4"


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Precision, rank, naming, family and counts from the header and the tensors' shapes (no weights loaded)."""
    path = Path(path)
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
        down = [k for k in keys if k.endswith((".proj_down", ".lora_down"))]
        if not down:
            raise QuantizationError(f"{path}: no SVDQuant layers (no '*.proj_down' or '*.lora_down' tensors): "
                                    "this is not a Nunchaku svdq-* file")
        rank = f.get_slice(down[0]).get_shape()[1]
        awq = {k.removesuffix(".wzeros") for k in keys if k.endswith(".wzeros")}
        scales = [k for k in keys if k.endswith(".wscales") and k.removesuffix(".wscales") not in awq]
        fp8 = any("F8" in f.get_slice(k).get_dtype() for k in scales)
    problems: list[str] = []
    qc = _json(meta.get("quantization_config"), "quantization_config", problems)
    ours = _json(meta.get("svdq_batch"), "svdq_batch", problems)
    config = _json(meta.get("config"), "config", problems) or None
    precision = "nvfp4" if fp8 or any(k.endswith((".wtscale", ".wcscales")) for k in keys) else "int4"
    info = CheckpointInfo(
        str(path), precision, int(rank), naming_of(keys),
        _family_from_keys(keys) or family_of_class(meta.get("model_class")), meta.get("model_class"),
        ours.get("act_unsigned"), _metadata_precision(qc), qc.get("rank"), config, sorted(meta),
        tensors=len(keys), bytes=path.stat().st_size, w4a4_layers=len(down), awq_layers=len(awq),
        blocks=_block_counts(keys), problems=problems)
    for key, said in (("precision", info.metadata_precision), ("rank", info.metadata_rank)):
        if said is not None and said != getattr(info, key):
            problems.append(f"metadata quantization_config says {key}={said} but the tensors are "
                            f"{key}={getattr(info, key)}")
    if qc and info.metadata_rank is None:
        info.notes.append("quantization_config has no rank: the rank is read from the tensors")
    if info.family and family_of_class(meta.get("model_class")) not in (None, info.family):
        # Nunchaku's merge script wrote its FLUX model_class into every file until late 2025, and no
        # loader reads model_class: the tensor names decide
        info.notes.append(f"model_class={meta.get('model_class')} but the tensor names are a {info.family} "
                          "model's; the tensors decide")
    if config and info.blocks:
        for key, count in info.blocks.items():
            if key in config and config[key] != count:
                problems.append(f"metadata config says {key}={config[key]} but the file has {count} such blocks")
    return info


def _block_counts(keys: list[str]) -> dict[str, int]:
    """Blocks per stack, from the tensor names: num_layers (transformer_blocks), num_single_layers."""
    names = {stack: key for arch in architectures() for stack, key in arch.block_stacks.items()}
    if not names:
        return {}
    pattern = re.compile(rf"({'|'.join(map(re.escape, names))})\.(\d+)\.")
    found: dict[str, set[int]] = {}
    for k in keys:
        m = pattern.match(k)
        if m:
            found.setdefault(m[1], set()).add(int(m[2]))
    return {names[stack]: len(ids) for stack, ids in found.items()}


def config_mismatches(file_config: dict[str, Any], model_config: dict[str, Any]) -> list[str]:
    """The shape-defining config keys on which the file's transformer and the model's disagree."""
    return [f"{k}: file {file_config[k]!r}, model {model_config[k]!r}" for k in SHAPE_KEYS
            if k in file_config and k in model_config and file_config[k] != model_config[k]]
