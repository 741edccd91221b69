"""Read and write Nunchaku-format SVDQuant checkpoints: one safetensors file per transformer.

Quantized layers are stored packed (packing.py) under Nunchaku's names; every other tensor of the
transformer is stored in 16 bits under its diffusers name. The header carries `config`, `model_class`,
`quantization_config` and `comfy_config` as the engine's merged files do, plus `svdq_batch` (our settings).
An architecture with a legacy naming is written with it by default where that is the only naming Nunchaku's
loaders read (architecture.py); reading takes both schemes (file_names.py). Reading fills a transformer built on the meta device:
every tensor comes from the file, so the 16-bit transformer weights are never read and need not exist.
A file that does not fit the model fails naming the tensor, the expected and the found shape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from pipeline.errors import QuantizationError
from pipeline.quantization import numerics as nx
from pipeline.quantization import packing as pk
from pipeline.quantization.architecture import Architecture, architecture_of
from pipeline.quantization.file_info import CheckpointInfo, inspect_checkpoint, quantization_config
from pipeline.quantization.layers import AWQW4A16Linear, SplitInputLinear, SVDQW4A4Linear
from pipeline.quantization.safetensors_file import TensorFile
from pipeline.quantization.targets import Target
from pipeline.quantization.transform import install, modulation_fold, quantized_layers

__all__ = ["CheckpointInfo", "default_naming", "file_layout", "file_name", "inspect_checkpoint", "load_checkpoint",
           "save_checkpoint", "state_dict_for_file"]
QUANTIZED_MODULES = (SVDQW4A4Linear, AWQW4A16Linear, SplitInputLinear)


def default_naming(arch: Architecture) -> str:
    """The naming an architecture's files are written with: legacy where that is all Nunchaku's loaders read."""
    return arch.naming


def _naming(arch: Architecture, naming: Optional[str]) -> str:
    naming = naming or default_naming(arch)
    if naming == "legacy" and arch.legacy_names is None:
        raise QuantizationError(f"{arch.name} files have no legacy naming scheme; use quantization.naming=diffusers")
    return naming


def _renamed(arch: Architecture, naming: str, table: dict) -> dict:
    """Keys in the file's naming (legacy: the architecture's per-block names)."""
    return {arch.legacy_names.to_legacy(k): v for k, v in table.items()} if naming == "legacy" else table


def file_name(precision: str, rank: int, model_name: str) -> str:
    """svdq-{int4|fp4}_r{rank}-<model>.safetensors, as Nunchaku's model repositories name them."""
    return f"svdq-{'int4' if precision == 'int4' else 'fp4'}_r{rank}-{model_name}.safetensors"


# ---------- writing ----------

def _pack_svdq(name: str, parts: list[SVDQW4A4Linear], fused: bool, dtype16: torch.dtype,
               zero_bias: bool = True) -> dict[str, torch.Tensor]:
    """One W4A4 layer in file layout. NVFP4 as DeepCompressor writes it: a fused q/k/v layer carries its per-tensor
    scale per output channel (`wcscales`, 16-bit), any other layer a 16-bit `wtscale` of shape (1,). A layer
    without a bias gets a zero one unless `zero_bias` is False (Architecture.zero_bias)."""
    first = parts[0]

    def cat(attr):
        ts = [getattr(p, attr) for p in parts]
        return None if ts[0] is None else torch.cat([t.cpu() for t in ts])

    nibbles, scales, bias = cat("packed_codes"), cat("wscales"), cat("bias")
    n, k = nibbles.shape[0], nibbles.shape[1] * 2
    pk.check_tileable(n, k, name)
    out = {
        f"{name}.qweight": pk.pack_weight_nibbles(nibbles),
        f"{name}.wscales": pk.pack_wscales(scales, first.precision),
        f"{name}.smooth_factor": pk.pack_vector(first.smooth.cpu()),
        f"{name}.smooth_factor_orig": pk.pack_vector(first.smooth_orig.cpu()),
        f"{name}.proj_down": pk.pack_proj_down(first.proj_down.cpu()),
        f"{name}.proj_up": pk.pack_proj_up(cat("proj_up")),
    }
    # every W4A4 layer carries a bias, zeros where the layer has none (DeepCompressor writes it so; Nunchaku's
    # layers always have one, e.g. the second half of a split proj_out under NVFP4), unless the architecture's
    # engine builds bias-less layers
    if bias is not None or zero_bias:
        out[f"{name}.bias"] = pk.pack_vector(bias if bias is not None else torch.zeros(n, dtype=first.smooth.dtype))
    if first.precision == "nvfp4":
        tensor_scale = torch.cat([p.wtscale.detach().cpu().float().reshape(1).expand(p.out_features) for p in parts])
        channel = cat("wcscales").float() if first.wcscales is not None else torch.ones(n)
        if fused:
            out[f"{name}.wcscales"] = pk.pack_vector(_exact(tensor_scale * channel, dtype16, f"{name}.wcscales"))
        else:
            scale = tensor_scale[:1]  # 16-bit as DeepCompressor writes it, unless that would round it
            out[f"{name}.wtscale"] = scale.to(dtype16) if torch.equal(scale.to(dtype16).float(), scale) else scale
            if not torch.equal(channel, torch.ones(n)):
                out[f"{name}.wcscales"] = pk.pack_vector(_exact(channel, dtype16, f"{name}.wcscales"))
    return out


def _exact(values: torch.Tensor, dtype16: torch.dtype, what: str) -> torch.Tensor:
    """A scale the file holds in 16 bits; the quantizer made it a 16-bit value, so nothing is rounded here."""
    stored = values.to(dtype16)
    if not torch.equal(stored.float(), values.float()):
        raise QuantizationError(f"{what}: the scale is not a {dtype16} value; the file would change the layer")
    return stored


def _file_fold(t: Target, n: int, arch: Architecture, naming: str) -> torch.Tensor:
    """The AdaLN "+1" a file's modulation bias holds. Nunchaku's files fold it in (its blocks run with
    scale_shift=0); an architecture's older diffusers-named files may not (`unfolded_diffusers_files`)."""
    if arch.unfolded_diffusers_files and naming == "diffusers":
        return torch.zeros(n)
    return modulation_fold(t, n)


def _pack_awq(name: str, layer: AWQW4A16Linear, t: Target, dtype16: torch.dtype, fold: torch.Tensor):
    s = t.mod_chunks
    return {
        f"{name}.qweight": pk.pack_awq_nibbles(pk.interleave_rows(layer.packed_codes.cpu(), s)),
        f"{name}.wscales": pk.interleave_rows(layer.wscales.cpu(), s).T.contiguous(),
        f"{name}.wzeros": pk.interleave_rows(layer.wzeros.cpu(), s).T.contiguous(),
        f"{name}.bias": pk.interleave_rows(layer.bias.cpu().float() + fold, s).to(dtype16),
    }


def state_dict_for_file(transformer: nn.Module, *, precision: str, naming: Optional[str] = None,
                        dtype16: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """All tensors of a quantized transformer in file layout: quantized packed, every other one in dtype16."""
    arch = architecture_of(transformer)
    naming = _naming(arch, naming)
    targets = {t.name: t for t in arch.targets(transformer)}
    tensors: dict[str, torch.Tensor] = {}
    for name, parts in quantized_layers(transformer).items():
        t = targets[name]
        if isinstance(parts[0], AWQW4A16Linear):
            tensors.update(_pack_awq(name, parts[0], t, dtype16, _file_fold(t, parts[0].out_features, arch, naming)))
        else:
            tensors.update(_pack_svdq(name, parts, len(t.parts) > 1, dtype16, arch.zero_bias))
    skip = tuple(f"{p}." for p, m in transformer.named_modules() if isinstance(m, QUANTIZED_MODULES))
    for key, value in transformer.state_dict().items():
        if not key.startswith(skip):
            value = value.detach().cpu()
            tensors[key] = (value.to(dtype16) if value.is_floating_point() else value).contiguous()
    return _renamed(arch, naming, tensors)


def file_layout(transformer: nn.Module, *, precision: str, rank: int, naming: Optional[str] = None,
                dtype16: torch.dtype = torch.bfloat16) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every tensor a file for this transformer holds, from module shapes alone (the
    transformer may be on the meta device): what `state_dict_for_file` writes and `load_checkpoint` reads. The AdaLN
    modulation counts as AWQ, as in every file Nunchaku publishes."""
    arch = architecture_of(transformer)
    naming = _naming(arch, naming)
    group = nx.group_size(precision)
    scale_dtype = dtype16 if precision == "int4" else torch.float8_e4m3fn
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    replaced: set[str] = set()
    for t in arch.targets(transformer):
        n, k = target_shape(transformer, t)
        replaced.update(t.parts)
        if t.kind == "awq":
            fields = {"qweight": ((n // 4, k // 2), torch.int32), "wscales": ((k // nx.INT4_GROUP, n), dtype16),
                      "wzeros": ((k // nx.INT4_GROUP, n), dtype16), "bias": ((n,), dtype16)}
        else:
            fields = {"qweight": ((n, k // 2), torch.int8), "wscales": ((k // group, n), scale_dtype),
                      "smooth_factor": ((k,), dtype16), "smooth_factor_orig": ((k,), dtype16),
                      "proj_down": ((k, rank), dtype16), "proj_up": ((n, rank), dtype16)}
            if arch.zero_bias or all(transformer.get_submodule(p).bias is not None for p in t.parts):
                fields["bias"] = ((n,), dtype16)
            if precision == "nvfp4":
                fields.update({"wcscales": ((n,), dtype16)} if len(t.parts) > 1 else {"wtscale": ((1,), dtype16)})
        layout.update({f"{t.name}.{f}": v for f, v in fields.items()})
    skip = tuple(f"{p}." for p in replaced)
    for key, value in transformer.state_dict().items():
        if not key.startswith(skip):
            layout[key] = (tuple(value.shape), dtype16 if value.is_floating_point() else value.dtype)
    return _renamed(arch, naming, layout)


def save_checkpoint(transformer: nn.Module, path: str | Path, *, precision: str, rank: int, act_unsigned: bool,
                    model_name: str, naming: Optional[str] = None, dtype16: torch.dtype = torch.bfloat16,
                    extra: Optional[dict[str, Any]] = None) -> Path:
    """Write the quantized transformer to `path` atomically (temp file + rename), with Nunchaku's metadata."""
    from safetensors.torch import save_file

    from pipeline import __version__

    arch = architecture_of(transformer)
    naming = _naming(arch, naming)
    path = Path(path)
    config = json.loads(transformer.to_json_string()) if hasattr(transformer, "to_json_string") else {}
    metadata = {
        "config": json.dumps(config),
        **({"comfy_config": json.dumps(arch.comfy_config(config), indent=2, sort_keys=True)}
           if arch.comfy_config else {}),
        "model_class": arch.model_class,
        "quantization_config": json.dumps(quantization_config(precision, rank)),
        "svdq_batch": json.dumps({"format_version": 2, "created_by": f"svdq-batch {__version__}", "model": model_name,
                                  "precision": precision, "rank": rank, "act_unsigned": act_unsigned,
                                  "naming": naming, **(extra or {})}),
    }
    tensors = state_dict_for_file(transformer, precision=precision, naming=naming, dtype16=dtype16)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files private (0600); share like any output
    os.replace(tmp, path)
    return path


# ---------- reading ----------

class _Reader:
    """The file's tensors under this project's names, each read once, in the order asked for (plain reads: the
    process holds only the tensors it keeps, safetensors_file.py)."""

    def __init__(self, path: Path, naming: str, arch: Architecture):
        self.path = path
        try:
            self.f = TensorFile(path)
        except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise QuantizationError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
        legacy = arch.legacy_names if naming == "legacy" else None
        if naming == "legacy" and legacy is None:
            self.f.close()
            raise QuantizationError(f"{path}: legacy (per-block) tensor names, which {arch.name} files do not use: "
                                    "the file is for another model")
        self.keys = {(legacy.to_diffusers(k) if legacy else k): k for k in self.f.keys()}
        self.file_name = legacy.to_legacy if legacy else str  # a key as the file would name it
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.keys

    def get(self, key: str, shape: Optional[tuple] = None, what: str = "", rows_at_least: bool = False,
            staged: bool = False) -> torch.Tensor:
        """The tensor under our name; `staged`: valid only until the next staged read (see TensorFile)."""
        if key not in self.keys:
            raise QuantizationError(f"{self.path}: missing tensor '{self.file_name(key)}'{what}; "
                                    "the file does not match this model")
        t = self.f.get_tensor(self.keys[key], staged)
        if shape is not None and not _fits(tuple(t.shape), tuple(shape), rows_at_least):
            raise QuantizationError(f"{self.path}: tensor '{self.keys[key]}' has shape {tuple(t.shape)}, expected "
                                    f"{tuple(shape)}{what}")
        self.used.add(key)
        return t

    def unused(self) -> list[str]:
        return sorted(self.keys[k] for k in self.keys if k not in self.used)


def _fits(found: tuple, expected: tuple, rows_at_least: bool) -> bool:
    if rows_at_least:  # TinyChat pads AWQ scale rows (groups) up; the extra rows are zeros
        return len(found) == len(expected) and found[0] >= expected[0] and found[1:] == expected[1:]
    return found == expected


def target_shape(transformer: nn.Module, t: Target) -> tuple[int, int]:
    """(N, K) of the layer a target quantizes, from module attributes alone (works on the meta device)."""
    mods = [transformer.get_submodule(p) for p in t.parts]
    n = sum(m.out_features for m in mods)
    k = (t.cols[1] - t.cols[0]) if t.cols else mods[0].in_features
    return n, k


def _home_device(transformer: nn.Module) -> torch.device:
    devices = {p.device for p in transformer.parameters() if p.device.type != "meta"}
    return next(iter(devices)) if devices else torch.device("cpu")


def load_checkpoint(transformer: nn.Module, path: str | Path, info: CheckpointInfo, *, act_unsigned: bool) -> list[str]:
    """Install the file's quantized layers and every other tensor into `transformer`; returns the layer names.

    The transformer may be built on the meta device (accelerate's init_empty_weights): every tensor it needs then
    comes from the file, in the dtype the transformer was built with; any tensor the file lacks is an error."""
    path = Path(path)
    arch = architecture_of(transformer)
    reader = _Reader(path, info.naming, arch)
    precision, rank = info.precision, info.rank
    group = nx.group_size(precision)
    device = _home_device(transformer)
    # optional targets (e.g. an AdaLN modulation) may be AWQ W4A16 or 16-bit in a file: the file decides.
    targets = [t for t in arch.targets(transformer) if not t.optional or reader.has(f"{t.name}.qweight")]
    replaced: set[str] = set()
    pending: dict = {}
    loaded = []
    for t in targets:
        n, k = target_shape(transformer, t)
        what = f" (layer {t.name}: {n}x{k}, rank {rank}, {precision})"
        if t.kind == "awq":
            layer = _read_awq(reader, t, n, k, what, _file_fold(t, n, arch, info.naming))
        else:
            layer = _read_svdq(reader, t, n, k, rank, precision, group, what,
                               unsigned=act_unsigned and t.after_gelu and precision == "int4")
        install(transformer, t, layer.to(device), pending)
        replaced.update(t.parts)
        loaded.append(t.name)
    _load_16bit(transformer, reader, tuple(f"{p}." for p in replaced))
    extra = reader.unused()
    reader.f.close()
    if extra:
        shown = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
        raise QuantizationError(f"{path}: {len(extra)} tensor(s) this model has no place for: {shown}. "
                                f"Is the file for another model (file says model_class={info.model_class})?")
    return loaded


def _load_16bit(transformer: nn.Module, reader: _Reader, skip: tuple[str, ...]) -> None:
    """Every tensor outside the quantized layers, from the file, in the dtype the transformer holds it in."""
    device = _home_device(transformer)
    for key, current in transformer.state_dict(keep_vars=True).items():
        module_path, _, leaf = key.rpartition(".")
        module = transformer.get_submodule(module_path) if module_path else transformer
        if key.startswith(skip) or isinstance(module, QUANTIZED_MODULES):
            continue
        value = reader.get(key, tuple(current.shape), " (16-bit tensor of the base transformer)")
        value = value.to(device=device, dtype=current.dtype)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[leaf] = value
        del value


def _read_svdq(r: _Reader, t: Target, n, k, rank, precision, group, what, unsigned: bool) -> SVDQW4A4Linear:
    p = t.name
    nibbles = pk.unpack_weight_nibbles(r.get(f"{p}.qweight", (n, k // 2), what, staged=True))
    scales = pk.unpack_wscales(r.get(f"{p}.wscales", (k // group, n), what), precision)
    smooth = pk.unpack_vector(r.get(f"{p}.smooth_factor", (k,), what))
    orig = pk.unpack_vector(r.get(f"{p}.smooth_factor_orig", (k,), what)) if r.has(f"{p}.smooth_factor_orig") else None
    down = pk.unpack_proj_down(r.get(f"{p}.proj_down", (k, rank), what))
    up = pk.unpack_proj_up(r.get(f"{p}.proj_up", (n, rank), what))
    bias = pk.unpack_vector(r.get(f"{p}.bias", (n,), what)) if r.has(f"{p}.bias") else None
    extra = {}
    if precision == "nvfp4":  # either may be absent (Nunchaku: wcscales -> ones, wtscale -> 1)
        wcscales = (pk.unpack_vector(r.get(f"{p}.wcscales", (n,), what)) if r.has(f"{p}.wcscales")
                    else torch.ones(n, dtype=smooth.dtype))
        wtscale = torch.tensor(1.0)
        if r.has(f"{p}.wtscale"):
            wtscale = r.get(f"{p}.wtscale", None, what).float()
            if wtscale.numel() != 1:
                raise QuantizationError(f"{r.path}: tensor '{r.keys[f'{p}.wtscale']}' has shape "
                                        f"{tuple(wtscale.shape)}, expected () or (1,){what}")
        extra = {"wcscales": wcscales, "wtscale": wtscale.reshape(())}
    return SVDQW4A4Linear(precision=precision, packed_codes=nibbles, wscales=scales, smooth=smooth, smooth_orig=orig,
                          proj_down=down, proj_up=up, bias=bias, act_unsigned=unsigned,
                          act_shift=nx.GELU_SHIFT if unsigned else 0.0, ckpt_name=p, **extra)


def _read_awq(r: _Reader, t: Target, n, k, what, fold: torch.Tensor) -> AWQW4A16Linear:
    p, s = t.name, t.mod_chunks
    nibbles = pk.deinterleave_rows(pk.unpack_awq_nibbles(r.get(f"{p}.qweight", (n // 4, k // 2), what, staged=True)), s)
    groups = k // nx.INT4_GROUP
    scales = pk.deinterleave_rows(r.get(f"{p}.wscales", (groups, n), what, rows_at_least=True)[:groups].T.contiguous(), s)
    zeros = pk.deinterleave_rows(r.get(f"{p}.wzeros", (groups, n), what, rows_at_least=True)[:groups].T.contiguous(), s)
    bias = pk.deinterleave_rows(r.get(f"{p}.bias", (n,), what).float(), s) - fold
    return AWQW4A16Linear(packed_codes=nibbles, wscales=scales, wzeros=zeros, bias=bias, ckpt_name=p)
