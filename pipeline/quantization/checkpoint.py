"""Read and write Nunchaku-format SVDQuant checkpoints: one safetensors file per transformer.

Quantized layers are stored packed (packing.py) under their Nunchaku names; every other tensor of
the transformer is stored as-is under its diffusers name. The header carries `config`,
`model_class` and `quantization_config` like the engine's files, plus `svdq_batch` (our settings).
Reading accepts diffusers-style names (`to_qkv`, `proj_down`, `smooth_factor`) and the legacy
FLUX names (`qkv_proj`, `lora_down`, `smooth`). A file that does not fit the model fails naming the
tensor, the expected and the found shape.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from pipeline.errors import QuantizationError
from pipeline.quantization import numerics as nx
from pipeline.quantization import packing as pk
from pipeline.quantization.layers import AWQW4A16Linear, SplitInputLinear, SVDQW4A4Linear
from pipeline.quantization.targets import Target, family_of, targets_for
from pipeline.quantization.transform import install, modulation_fold, quantized_layers

MODEL_CLASSES = {"flux": "NunchakuFluxTransformer2dModel", "qwen-image": "NunchakuQwenImageTransformer2DModel"}
WEIGHT_DTYPES = {"int4": "int4", "nvfp4": "fp4_e2m1_all"}
LEGACY_FIELDS = {"lora_down": "proj_down", "lora_up": "proj_up", "smooth": "smooth_factor",
                 "smooth_orig": "smooth_factor_orig"}
LEGACY_DOUBLE = {"qkv_proj": "attn.to_qkv", "qkv_proj_context": "attn.add_qkv_proj", "out_proj": "attn.to_out.0",
                 "out_proj_context": "attn.to_add_out", "mlp_fc1": "ff.net.0.proj", "mlp_fc2": "ff.net.2",
                 "mlp_context_fc1": "ff_context.net.0.proj", "mlp_context_fc2": "ff_context.net.2"}
LEGACY_SINGLE = {"qkv_proj": "attn.to_qkv", "out_proj": "attn.to_out", "mlp_fc1": "mlp_fc1", "mlp_fc2": "mlp_fc2"}


def file_name(precision: str, rank: int, model_name: str) -> str:
    """svdq-{int4|fp4}_r{rank}-<model>.safetensors, as Nunchaku's model repositories name them."""
    return f"svdq-{'int4' if precision == 'int4' else 'fp4'}_r{rank}-{model_name}.safetensors"


# ---------- writing ----------

def _pack_svdq(name: str, parts: list[SVDQW4A4Linear]) -> dict[str, torch.Tensor]:
    first = parts[0]

    def cat(attr):
        ts = [getattr(p, attr) for p in parts]
        return None if ts[0] is None else torch.cat([t.cpu() for t in ts])

    codes, scales, bias = cat("qweight"), cat("wscales"), cat("bias")
    n, k = codes.shape
    pk.check_tileable(n, k, name)
    out = {
        f"{name}.qweight": pk.pack_weight_codes(codes),
        f"{name}.wscales": pk.pack_wscales(scales, first.precision),
        f"{name}.smooth_factor": pk.pack_vector(first.smooth.cpu()),
        f"{name}.smooth_factor_orig": pk.pack_vector(first.smooth_orig.cpu()),
        f"{name}.proj_down": pk.pack_proj_down(first.proj_down.cpu()),
        f"{name}.proj_up": pk.pack_proj_up(cat("proj_up")),
    }
    if bias is not None:
        out[f"{name}.bias"] = pk.pack_vector(bias)
    if first.precision == "nvfp4":
        out[f"{name}.wcscales"] = pk.pack_vector(cat("wcscales"))
        out[f"{name}.wtscale"] = first.wtscale.detach().cpu().float().reshape(())
    return out


def _file_fold(t: Target, n: int, family: str, naming: str) -> torch.Tensor:
    """The AdaLN "+1" the file's modulation bias holds: Qwen-Image and legacy FLUX files fold it in;
    diffusers-named FLUX files do not (the engine keeps diffusers' AdaLayerNormZero, which adds it)."""
    if family == "flux" and naming == "diffusers":
        return torch.zeros(n)
    return modulation_fold(t, n)


def _pack_awq(name: str, layer: AWQW4A16Linear, t: Target, dtype16: torch.dtype, fold: torch.Tensor):
    s = t.mod_chunks
    return {
        f"{name}.qweight": pk.pack_awq_codes(pk.interleave_rows(layer.qweight.cpu(), s)),
        f"{name}.wscales": pk.interleave_rows(layer.wscales.cpu(), s).T.contiguous(),
        f"{name}.wzeros": pk.interleave_rows(layer.wzeros.cpu(), s).T.contiguous(),
        f"{name}.bias": pk.interleave_rows(layer.bias.cpu().float() + fold, s).to(dtype16),
    }


def _legacy_name(name: str) -> str:
    m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", name)
    table = LEGACY_DOUBLE if m and m[1] == "transformer_blocks" else LEGACY_SINGLE
    inverse = {v: k for k, v in table.items()}
    return f"{m[1]}.{m[2]}.{inverse[m[3]]}" if m and m[3] in inverse else name


def state_dict_for_file(transformer: nn.Module, *, precision: str, rank: int, naming: str = "diffusers",
                        dtype16: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """All tensors of a quantized transformer in file layout (quantized packed, the rest as-is)."""
    targets = {t.name: t for t in targets_for(transformer)}
    tensors: dict[str, torch.Tensor] = {}
    for name, parts in quantized_layers(transformer).items():
        if isinstance(parts[0], AWQW4A16Linear):
            t = targets[name]
            fold = _file_fold(t, parts[0].out_features, family_of(transformer), naming)
            packed = _pack_awq(name, parts[0], t, dtype16, fold)
        else:
            packed = _pack_svdq(name, parts)
        if naming == "legacy":
            packed = {_legacy_key(k): v for k, v in packed.items()}
        tensors.update(packed)
    skip = tuple(f"{p}." for p, m in transformer.named_modules()
                 if isinstance(m, (SVDQW4A4Linear, AWQW4A16Linear, SplitInputLinear)))
    for key, value in transformer.state_dict().items():
        if not key.startswith(skip):
            tensors[key] = value.detach().cpu().contiguous()
    return tensors


def _legacy_key(key: str) -> str:
    module, _, fld = key.rpartition(".")
    inverse_fields = {v: k for k, v in LEGACY_FIELDS.items()}
    return f"{_legacy_name(module)}.{inverse_fields.get(fld, fld)}"


def save_checkpoint(transformer: nn.Module, path: str | Path, *, precision: str, rank: int, act_unsigned: bool,
                    model_name: str, naming: str = "diffusers", dtype16: torch.dtype = torch.bfloat16,
                    extra: Optional[dict[str, Any]] = None) -> Path:
    """Write the quantized transformer to `path` atomically (temp file + rename)."""
    from safetensors.torch import save_file

    from pipeline import __version__

    if naming == "legacy" and family_of(transformer) != "flux":
        raise QuantizationError("the legacy naming scheme exists only for FLUX files; use naming=diffusers")
    path = Path(path)
    group = nx.group_size(precision)
    spec = {"dtype": WEIGHT_DTYPES[precision], "scale_dtype": "float8_e4m3fn" if precision == "nvfp4" else str(dtype16).removeprefix("torch."), "group_size": group}
    metadata = {
        "config": transformer.to_json_string() if hasattr(transformer, "to_json_string") else "{}",
        "model_class": MODEL_CLASSES[family_of(transformer)],
        "quantization_config": json.dumps({"method": "svdquant", "weight": spec, "activation": spec, "rank": rank}),
        "svdq_batch": json.dumps({"format_version": 1, "created_by": f"svdq-batch {__version__}", "model": model_name,
                                  "precision": precision, "rank": rank, "act_unsigned": act_unsigned,
                                  "naming": naming, **(extra or {})}),
    }
    tensors = state_dict_for_file(transformer, precision=precision, rank=rank, naming=naming, dtype16=dtype16)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files private (0600); share like any output
    os.replace(tmp, path)
    return path


# ---------- reading ----------

@dataclass
class CheckpointInfo:
    path: str
    precision: str
    rank: int
    naming: str
    model_class: Optional[str]
    act_unsigned: Optional[bool]
    metadata_precision: Optional[str] = None
    metadata_rank: Optional[int] = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _open(path: Path):
    from safetensors import safe_open

    if not path.is_file():
        raise QuantizationError(f"quantization.path={path}: no such file. Point it at an svdq-*.safetensors file.")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for truncated/invalid files
        raise QuantizationError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def _normalize_key(key: str, naming: str) -> str:
    if naming != "legacy":
        return key
    module, _, fld = key.rpartition(".")
    fld = LEGACY_FIELDS.get(fld, fld)
    m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", module)
    if m:
        table = LEGACY_DOUBLE if m[1] == "transformer_blocks" else LEGACY_SINGLE
        module = f"{m[1]}.{m[2]}.{table.get(m[3], m[3])}"
    return f"{module}.{fld}"


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Precision, rank and naming from the header and the tensors themselves (no weights loaded)."""
    path = Path(path)
    with _open(path) as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
        naming = "legacy" if any(k.endswith((".lora_down", ".smooth")) for k in keys) else "diffusers"
        down = [k for k in keys if k.endswith((".proj_down", ".lora_down"))]
        if not down:
            raise QuantizationError(f"{path}: no SVDQuant layers (no '*.proj_down' or '*.lora_down' tensors): "
                                    "this is not a Nunchaku svdq-* file")
        rank = f.get_slice(down[0]).get_shape()[1]
        scales = [k for k in keys if k.endswith(".wscales") and k.replace(".wscales", ".wzeros") not in keys]
        dtype = f.get_slice(scales[0]).get_dtype() if scales else ""
        precision = "nvfp4" if ("F8" in dtype or any(k.endswith(".wtscale") for k in keys)) else "int4"
    qc = _json(meta.get("quantization_config"))
    ours = _json(meta.get("svdq_batch"))
    meta_precision = None
    if qc.get("weight", {}).get("dtype"):
        meta_precision = "nvfp4" if "fp4" in qc["weight"]["dtype"] else "int4"
    meta_rank = qc.get("rank")
    return CheckpointInfo(str(path), precision, int(rank), naming, meta.get("model_class"),
                          ours.get("act_unsigned"), meta_precision, meta_rank)


def _json(text: Optional[str]) -> dict:
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}


class _Reader:
    def __init__(self, path: Path, naming: str):
        self.path, self.f = path, _open(path)
        self.keys = {_normalize_key(k, naming): k for k in self.f.keys()}
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.keys

    def get(self, key: str, shape: Optional[tuple] = None, what: str = "") -> torch.Tensor:
        if key not in self.keys:
            raise QuantizationError(f"{self.path}: missing tensor '{key}'{what}; the file does not match this model")
        t = self.f.get_tensor(self.keys[key])
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise QuantizationError(f"{self.path}: tensor '{key}' has shape {tuple(t.shape)}, expected "
                                    f"{tuple(shape)}{what}")
        self.used.add(key)
        return t

    def unused(self) -> list[str]:
        return sorted(k for k in self.keys if k not in self.used)


def load_checkpoint(transformer: nn.Module, path: str | Path, info: CheckpointInfo, *, act_unsigned: bool) -> list[str]:
    """Replace the transformer's target layers with the file's and load every other tensor; returns names."""
    from pipeline.quantization.transform import get_module, target_weight

    path = Path(path)
    reader = _Reader(path, info.naming)
    precision, rank = info.precision, info.rank
    group = nx.group_size(precision)
    device = next(transformer.parameters()).device
    # FLUX files may hold the AdaLN modulation as AWQ W4A16 or in 16 bits: the file decides.
    targets = [t for t in targets_for(transformer) if not t.optional or reader.has(f"{t.name}.qweight")]
    replaced: set[str] = set()
    pending: dict = {}
    loaded = []
    for t in targets:
        w, b = target_weight(transformer, t)
        n, k = w.shape
        what = f" (layer {t.name}: {n}x{k}, rank {rank}, {precision})"
        if t.kind == "awq":
            layer = _read_awq(reader, t, n, k, what, _file_fold(t, n, family_of(transformer), info.naming))
        else:
            layer = _read_svdq(reader, t, n, k, rank, precision, group, what,
                               unsigned=act_unsigned and t.after_gelu and precision == "int4")
        install(transformer, t, layer.to(device), pending)
        replaced.update(t.parts)
        loaded.append(t.name)
    skip = tuple(f"{p}." for p in replaced)
    for key, param in transformer.state_dict().items():
        if key.startswith(skip) or _is_quantized_buffer(transformer, key):
            continue
        value = reader.get(key, tuple(param.shape), " (16-bit tensor of the base transformer)")
        get_param = _param_ref(transformer, key)
        with torch.no_grad():
            get_param.copy_(value.to(get_param.dtype))
    extra = reader.unused()
    if extra:
        shown = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
        raise QuantizationError(f"{path}: {len(extra)} tensor(s) this model has no place for: {shown}. "
                                f"Is the file for another model (file says model_class={info.model_class})?")
    return loaded


def _is_quantized_buffer(transformer: nn.Module, key: str) -> bool:
    module = transformer.get_submodule(key.rpartition(".")[0]) if "." in key else transformer
    return isinstance(module, (SVDQW4A4Linear, AWQW4A16Linear, SplitInputLinear))


def _param_ref(transformer: nn.Module, key: str) -> torch.Tensor:
    module_path, _, leaf = key.rpartition(".")
    module = transformer.get_submodule(module_path) if module_path else transformer
    return getattr(module, leaf)


def _read_svdq(r: _Reader, t: Target, n, k, rank, precision, group, what, unsigned: bool) -> SVDQW4A4Linear:
    p = t.name
    codes = pk.unpack_weight_codes(r.get(f"{p}.qweight", (n, k // 2), what), signed=precision == "int4")
    scales = pk.unpack_wscales(r.get(f"{p}.wscales", (k // group, n), what), precision)
    smooth = pk.unpack_vector(r.get(f"{p}.smooth_factor", (k,), what))
    orig = pk.unpack_vector(r.get(f"{p}.smooth_factor_orig", (k,), what)) if r.has(f"{p}.smooth_factor_orig") else None
    down = pk.unpack_proj_down(r.get(f"{p}.proj_down", (k, rank), what))
    up = pk.unpack_proj_up(r.get(f"{p}.proj_up", (n, rank), what))
    bias = pk.unpack_vector(r.get(f"{p}.bias", (n,), what)) if r.has(f"{p}.bias") else None
    extra = {}
    if precision == "nvfp4":
        extra = {"wcscales": pk.unpack_vector(r.get(f"{p}.wcscales", (n,), what)),
                 "wtscale": r.get(f"{p}.wtscale", None, what).float().reshape(())}
    return SVDQW4A4Linear(precision=precision, qweight=codes, wscales=scales, smooth=smooth, smooth_orig=orig,
                          proj_down=down, proj_up=up, bias=bias, act_unsigned=unsigned,
                          act_shift=nx.GELU_SHIFT if unsigned else 0.0, ckpt_name=p, **extra)


def _read_awq(r: _Reader, t: Target, n, k, what, fold: torch.Tensor) -> AWQW4A16Linear:
    p, s = t.name, t.mod_chunks
    codes = pk.deinterleave_rows(pk.unpack_awq_codes(r.get(f"{p}.qweight", (n // 4, k // 2), what)), s)
    groups = k // nx.INT4_GROUP
    scales = pk.deinterleave_rows(r.get(f"{p}.wscales", (groups, n), what).T.contiguous(), s)
    zeros = pk.deinterleave_rows(r.get(f"{p}.wzeros", (groups, n), what).T.contiguous(), s)
    bias = pk.deinterleave_rows(r.get(f"{p}.bias", (n,), what).float(), s) - fold
    return AWQW4A16Linear(qweight=codes, wscales=scales, wzeros=zeros, bias=bias, ckpt_name=p)
