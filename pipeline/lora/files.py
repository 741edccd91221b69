"""A LoRA file -> `LoraWeights`: its layers under the diffusers module paths of the model's transformer.

Formats, and who converts them (diffusers' own converters wherever they cover a format, called through the
pipeline's `lora_state_dict` classmethod, i.e. FluxLoraLoaderMixin / QwenImageLoraLoaderMixin /
ZImageLoraLoaderMixin, which pick the converter from the keys):
  diffusers / PEFT   `transformer_blocks.0.attn.to_q.lora_A.weight` (optionally `transformer.` or PEFT's
                     `base_model.model.` in front, `.default` adapter names, `.alpha` keys): already diffusers names.
                     ai-toolkit writes this too (FLUX: `transformer.`-prefixed, Qwen-Image: `diffusion_model.`).
  kohya / sd-scripts `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` (+ `.lora_up`, `.alpha`), and the
                     "mixture" `lora_transformer_*` names: FLUX -> `_convert_kohya_flux_lora_to_diffusers`;
                     Qwen-Image `lora_unet_transformer_blocks_0_attn_to_q`
                       -> `_convert_non_diffusers_qwen_lora_to_diffusers`;
                     Z-Image `lora_unet_layers_0_attention_to_q` -> `_convert_non_diffusers_z_image_lora_to_diffusers`.
  BFL / ComfyUI      FLUX `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight` (or `lora_down`, or without
                     the prefix): renamed to the `diffusion_model.` + `lora_down`/`lora_up` spelling the kohya FLUX
                     converter reads (its ComfyUI branch), then converted by it; Qwen-Image / Z-Image
                     `diffusion_model.transformer_blocks...` by their converters.
  XLabs (FLUX)       `double_blocks.0.processor.qkv_lora1.down.weight` -> `_convert_xlabs_flux_lora_to_diffusers`.
  Z-Image community  `layers.0.attention.to.q.lora.down.weight`, fused `qkv`: the Z-Image converter.
Text-encoder LoRA keys (`lora_te*_`, `text_encoder*.`, `text_encoders.`, `te*.`) are out of scope: they are not
applied, and they are listed in `ignored` (never an error, strict or not).

How it is done: the keys are grouped by module (one group: a down, an up, maybe an alpha), and each group is
converted on its own, so every converted layer knows the file key it came from (messages name it, `ignored` lists
it) and nothing a converter would drop goes unnoticed. Two groups giving the same layer are an error (the file holds
that layer twice), except in the community `.lora.down` spelling, whose converter (Z-Image's) documents redundant
keys (a fused `qkv` next to `to.q/to.k/to.v`, a bare `out` next to `to_out.0`): those groups are converted together
and the converter keeps what it keeps for the whole file.

Alpha: every format that has `.alpha` means delta W = alpha / rank * up @ down, rank the file's down rows. The
alpha is taken out of each group before conversion (the converters get none, or alpha = rank where one insists),
so they fold nothing, and `LoraLayer.scale` = alpha / rank of that group (converters that split a fused layer's
rank keep the original rank's scale, as they do). Without alpha the scale is 1, except for a diffusers/PEFT file
whose LoraConfig is stored with it (`lora_adapter_metadata` in the safetensors header, as diffusers'
save_lora_adapter/save_lora_weights write it, or PEFT's adapter_config.json next to adapter_model.safetensors):
there lora_alpha / r (or / sqrt(r) with use_rslora), per layer with alpha_pattern (r is the tensor's rank, so
rank_pattern needs nothing). Tensors are read as
fp32 before any conversion (a bf16 file loses nothing to the splits). Two things differ from calling the
converters on the whole file: kohya's FLUX converter ignores the alpha of `final_layer` keys (here it counts),
and it hard-codes FLUX.1-dev's single-block sizes (below).

Kohya single-block `linear1` (fused q, k, v and the MLP input of a FLUX single block; `single_blocks.N.linear1` in
the kohya, ComfyUI and BFL spellings): diffusers' kohya converter splits its up rows at FLUX.1-dev's sizes
(3072, 3072, 3072, 12288) and fails on any other width. Those groups are split here instead, at the model's own
sizes (the out_features of attn.to_q, attn.to_k, attn.to_v and proj_mlp of that block), the down shared by the
four, as the converter does for a dense up (a block-sparse up gives the same delta W). A file whose up rows do not
add up to the model's sizes is a width mismatch (LoraError).

Checks, all before anything is applied: the architecture the file was made for (from its keys: double/single
blocks -> flux, img_mod/img_mlp/txt_mlp -> qwen-image, layers.N.attention/feed_forward -> z-image, UNet blocks ->
a Stable Diffusion UNet) against the model's; every layer's shapes against the model's linear (in_features,
out_features); keys that match no linear layer: LoraError naming them and the three nearest layer names (difflib),
or, with strict=False, listed in `ignored`. Keys that are not LoRA matrices (DoRA magnitudes, LoKr/LoHa,
full-weight `diff`s, biases) count as keys that match no layer.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from pipeline.errors import LoraError
from pipeline.lora import LoraLayer, LoraWeights

log = logging.getLogger("pipeline")

__all__ = ["read_lora", "made_for"]

# (regex on a key, role): the LoRA matrices and alphas as the formats spell them; group 1 is the module stem.
_PARTS = (
    (re.compile(r"^(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$"), None),  # PEFT/diffusers, optional adapter name
    (re.compile(r"^(.+)\.lora_(down|up)\.weight$"), None),  # kohya and most community formats
    (re.compile(r"^(.+)\.lora\.(down|up)\.weight$"), "dot"),  # Z-Image community trainers
    (re.compile(r"^(.+\.processor\.\w+_lora\d*)\.(down|up)\.weight$"), "xlabs"),  # XLabs
    (re.compile(r"^(.+)\.(alpha)$"), None),
)
_ROLE = {"A": "down", "B": "up", "down": "down", "up": "up", "alpha": "alpha"}
_WRAPPERS = ("base_model.model.", "transformer.")  # PEFT's save_pretrained, diffusers pipelines' save_lora_weights
_TEXT_ENCODER = re.compile(r"^(lora_te\d*_|lora_te\d*\.|text_encoders?(_\d+)?\.|te\d*\.|text_model\.|"
                           r"cond_stage_model\.|conditioner\.)")
# what a file was made for, by its keys: the first architecture any key names (FLUX's markers are its own; Qwen's
# img_mod/img_mlp also appear in FLUX's BFL names, so FLUX is asked first)
_MADE_FOR = (
    ("flux", re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks|norm1_context|ff_context)"
                        r"[._]|\.processor\.(qkv|proj)_lora")),
    ("qwen-image", re.compile(r"(^|[._])(img_mod|txt_mod|img_mlp|txt_mlp)[._]")),
    ("z-image", re.compile(r"(^|[._])(layers[._]\d+[._](attention|feed_forward|adaLN_modulation)|noise_refiner|"
                           r"context_refiner|all_final_layer|all_x_embedder|cap_embedder)[._]")),
    ("Stable Diffusion UNet", re.compile(r"(^|[._])(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|"
                                         r"middle_block)[._]")),
)
_BFL = re.compile(r"^(diffusion_model\.)?(double_blocks|single_blocks|final_layer|img_in|txt_in|time_in|vector_in|"
                  r"guidance_in)(\.|$)")
_LINEAR1 = re.compile(r"^(?:lora_unet_|diffusion_model\.)?single_blocks[._](\d+)[._]linear1$")
_NOT_LORA_HINTS = (("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"), ("lokr_", "LoKr"), ("hada_", "LoHa"),
                   (".diff", "a full-weight difference"), ("lora_mid", "LoCon/Tucker"), (".bias", "a bias"))


@dataclass(eq=False)  # a group is an identity (a dict key), not a value
class _Group:
    """One module's LoRA as the file holds it."""

    stem: str  # the module name as the file spells it, wrappers (`transformer.`, ...) removed
    keys: dict[str, str] = field(default_factory=dict)  # role (down/up/alpha) -> the file's key
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # role -> tensor (fp32)
    names: dict[str, str] = field(default_factory=dict)  # role -> the key as it was written, wrappers removed
    spelling: Optional[str] = None  # None, "dot" or "xlabs"

    @property
    def file_keys(self) -> list[str]:
        return [self.keys[r] for r in ("down", "up", "alpha") if r in self.keys]

    @property
    def key(self) -> str:
        return self.keys.get("down") or next(iter(self.keys.values()))


def made_for(keys) -> Optional[str]:
    """The architecture ("flux", "qwen-image", "z-image", or "Stable Diffusion UNet") a LoRA's keys name, or None
    when they name none in particular (e.g. only `transformer_blocks.N.attn.to_q`, which FLUX and Qwen-Image share)."""
    keys = [k for k in keys if not _TEXT_ENCODER.match(k)]
    for name, pattern in _MADE_FOR:
        if any(pattern.search(k) for k in keys):
            return name
    return None


def read_lora(path: str | Path, transformer: nn.Module, family: str, strict: bool = True) -> LoraWeights:
    """Read the LoRA at `path` for `transformer` (a diffusers transformer of model family `family`: its module
    names and linear shapes are what the file is checked against; the meta device is enough) -> LoraWeights, its
    layers keyed by the unquantized diffusers module path. LoraError for a missing or unreadable file, one made for
    another architecture or width, or (strict) keys that match no layer; strict=False lists those in `ignored`."""
    from pipeline.families import family as get_family

    arch = get_family(family).architecture.name
    file = _resolve(path)
    tensors, metadata = _load(file)
    from pipeline.lora.spec import file_sha256

    st = file.stat()
    sha = file_sha256(str(file), st.st_size, st.st_mtime_ns)

    text_encoder = [k for k in tensors if _TEXT_ENCODER.match(k)]
    rest = {k: v for k, v in tensors.items() if not _TEXT_ENCODER.match(k)}
    found = made_for(rest)
    if found is not None and found != arch:
        example = next(k for k in rest if dict(_MADE_FOR)[found].search(k))
        what = found if "UNet" in found else f"{found} transformer"
        raise LoraError(
            f"LoRA {file} was made for a {what} (keys such as {example!r}), but model family {family!r} has a "
            f"{arch} transformer. Use a LoRA trained for {arch} models, or run it with the model it was made for.")
    fmt = _format(list(rest), metadata, arch)
    shapes = _linear_shapes(transformer, family)

    groups, not_lora = _groups(rest)
    problems: list[tuple[list[str], str, str]] = []  # (file keys, what is wrong, name to find the nearest layers by)
    for key in not_lora:
        hint = next((what for marker, what in _NOT_LORA_HINTS if marker in key), None)
        problems.append(([key], "not a LoRA matrix" + (f" ({hint}, not supported)" if hint else ""),
                         _query(key)))
    for g in [g for g in groups if "down" not in g.tensors or "up" not in g.tensors]:
        groups.remove(g)
        problems.append((g.file_keys, f"has no {'up' if 'down' in g.tensors else 'down'} matrix", _query(g.stem)))

    peft = _peft_config(metadata, file)
    try:
        converted = _convert(file, groups, arch, get_family(family).pipeline_class, shapes, problems)
    except _WidthMismatch as e:
        raise _width_error(file, e.group, e.what, found or arch) from None
    layers: dict[str, LoraLayer] = {}
    sources: dict[str, _Group] = {}
    for g, (outputs, scale) in converted.items():
        if scale is None:
            scale = 1.0
            if peft is not None and g.spelling is None and not _kohya_style(g.stem, arch):
                scale = None  # per layer, from the stored LoraConfig
        for module, (down, up) in outputs.items():
            layers[module] = LoraLayer(down=down.float().contiguous(), up=up.float().contiguous(),
                                       scale=float(_peft_scale(peft, module, down.shape[0]) if scale is None
                                                   else scale))
            sources[module] = g

    _check_shapes(file, layers, sources, shapes, arch, found)
    dropped: set[_Group] = set()  # a group with a layer the model lacks is dropped whole (no partial fused LoRA)
    for m in [m for m in layers if m not in shapes]:
        g = sources[m]
        if g not in dropped:
            dropped.add(g)
            problems.append((g.file_keys, f"converts to {m}, which is not a linear layer of this model", m))
    layers = {m: lay for m, lay in layers.items() if sources[m] not in dropped}

    if problems and strict:
        raise LoraError(_unknown_message(file, arch, problems, shapes))
    ignored = tuple(text_encoder) + tuple(k for keys, _, _ in problems for k in keys)
    if text_encoder:
        log.info("LoRA %s: %d text-encoder keys are not applied (only the transformer's LoRA is)", file.name,
                 len(text_encoder))
    if not layers:
        raise LoraError(
            f"LoRA {file} holds no LoRA for this {arch} transformer"
            + (f" (only text-encoder keys, which are not applied: {len(text_encoder)})" if text_encoder else "")
            + (f" ({len(problems)} keys match no layer)" if problems else "") + ".")
    return LoraWeights(name=file.stem, path=str(file), sha256=sha, format=fmt, family=found or arch,
                       layers=dict(sorted(layers.items())), ignored=ignored)


# ----------------------------------------------------------------------------------------------- file and keys


def _resolve(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        where = " (a folder)" if p.is_dir() else ""
        raise LoraError(f"no LoRA file at {p}{where}: check the path (relative paths are from the working directory, "
                        "or a manifest's folder for a row's loras), or download the .safetensors file there.")
    return p.resolve()


def _load(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor (fp32) and the header's metadata; LoraError naming the file if it is not a whole safetensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types, and OSError)
        pickled = file.suffix.lower() in (".pt", ".pth", ".bin", ".ckpt")
        raise LoraError(
            f"LoRA {file} is not a readable safetensors file ({type(e).__name__}: {e})"
            + ("; pickled checkpoints are not read (loading them can run code): use the .safetensors release"
               if pickled else "; it may be truncated or corrupt: download it again") + ".") from None
    if not tensors:
        raise LoraError(f"LoRA {file} holds no tensors.")
    out = {}
    for k, t in tensors.items():
        out[k] = t.float() if t.is_floating_point() else t
    return out, metadata


def _groups(tensors: dict[str, torch.Tensor]) -> tuple[list[_Group], list[str]]:
    """The LoRA matrices grouped by module, and the keys that are none."""
    groups: dict[str, _Group] = {}
    not_lora = []
    for key, t in tensors.items():
        name = key
        for w in _WRAPPERS:
            if name.startswith(w) and len(name) > len(w):
                name = name[len(w):]
        for pattern, spelling in _PARTS:
            m = pattern.match(name)
            if m:
                break
        else:
            not_lora.append(key)
            continue
        stem, role = m.group(1), _ROLE[m.group(2)]
        if role in groups.get(stem, _Group(stem)).keys or (t.numel() != 1 if role == "alpha" else t.dim() != 2):
            not_lora.append(key)  # a second spelling of the same matrix, or a conv / malformed one
            continue
        g = groups.setdefault(stem, _Group(stem))
        g.keys[role], g.tensors[role], g.names[role] = key, t, name
        if spelling:
            g.spelling = spelling
    return list(groups.values()), not_lora


def _format(keys: list[str], metadata: dict[str, str], arch: str) -> str:
    """A label for the file's format (run.json shows it)."""
    if "ai-toolkit" in (metadata.get("software", "") + metadata.get("training_info", "")):
        return "ai-toolkit"
    if any(".processor." in k for k in keys):
        return "xlabs"
    if any(k.startswith(("lora_unet_", "lora_transformer_")) for k in keys) or any(k.startswith("ss_")
                                                                                   for k in metadata):
        return "kohya"
    if arch == "flux" and any(_BFL.match(k) for k in keys):
        return "bfl"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(".lora_down." in k or ".lora.down." in k for k in keys):
        return "community"
    return "diffusers"


def _kohya_style(stem: str, arch: str) -> bool:
    return stem.startswith(("lora_unet_", "lora_transformer_", "diffusion_model.")) or (
        arch == "flux" and bool(_BFL.match(stem)))


def _query(key: str) -> str:
    """A file key as a diffusers-like module name, to find the nearest layers by."""
    for w in (*_WRAPPERS, "diffusion_model.", "lora_unet_", "lora_transformer_"):
        key = key.removeprefix(w)
    return re.sub(r"\.(lora_[AB]|lora_down|lora_up|alpha|weight|down|up|lora)\b.*$", "", key)


# ----------------------------------------------------------------------------------------------- the model


_SHAPES_CACHE: dict[tuple, dict[str, tuple[int, int]]] = {}


def _linear_shapes(transformer: nn.Module, family: str) -> dict[str, tuple[int, int]]:
    """module path -> (in_features, out_features) of every linear layer of the unquantized diffusers transformer:
    `transformer` itself, or, where it holds this project's quantized or fused modules, one built from its config
    on the meta device."""
    modules = dict(transformer.named_modules())
    if any(type(m).__module__.startswith("pipeline.") for m in modules.values()):
        config = dict(getattr(transformer, "config", {}) or {})
        key = (family, json.dumps(config, sort_keys=True, default=str))
        if key not in _SHAPES_CACHE:
            from pipeline.models.quantized import meta_transformer

            _SHAPES_CACHE[key] = _linear_shapes(meta_transformer(family, config, torch.bfloat16), family)
        return _SHAPES_CACHE[key]
    return {n: (m.in_features, m.out_features) for n, m in modules.items() if isinstance(m, nn.Linear)}


# ----------------------------------------------------------------------------------------------- conversion


def _loader(pipeline_class: str):
    import diffusers

    return getattr(diffusers, pipeline_class)


def _feed(g: _Group, arch: str, with_alpha: bool = False) -> dict[str, torch.Tensor]:
    """The group under the key names the architecture's diffusers converter reads (see the module docstring);
    `with_alpha`: its own alpha too (for groups converted together), where the converter reads the file's spelling."""
    down, up = g.tensors["down"], g.tensors["up"]
    if arch != "flux" or g.spelling is not None:  # Qwen-Image, Z-Image, XLabs: the converters read every spelling
        out = {g.names["down"]: down, g.names["up"]: up}
        if with_alpha and "alpha" in g.tensors:
            out[g.names["alpha"]] = g.tensors["alpha"]
        return out
    if _kohya_style(g.stem, arch):  # kohya, and BFL/ComfyUI names in the spelling its ComfyUI branch reads
        stem = g.stem if g.stem.startswith(("lora_unet_", "lora_transformer_", "diffusion_model.")) \
            else "diffusion_model." + g.stem
        alpha = torch.tensor(float(down.shape[0]))  # neutral: the scale is applied here (its mixture path needs one)
        return {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": alpha}
    return {f"{g.stem}.lora_A.weight": down, f"{g.stem}.lora_B.weight": up}  # diffusers names


def _run_converter(loader, fed: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers' conversion of `fed` -> {module: (down, up)}; ValueError if it fails or gives something else."""
    from pipeline.models.build import quiet_diffusers

    try:
        with quiet_diffusers():
            out = loader.lora_state_dict(dict(fed))
    except Exception as e:  # noqa: BLE001  (the converters raise ValueError, KeyError, AssertionError, RuntimeError)
        text = " ".join(str(e).split())
        if any(k in text for k in fed):  # "Incompatible keys ...", "should be empty but has ...": names the keys
            raise ValueError("diffusers' converter knows no layer by this name") from None
        raise ValueError(f"diffusers' converter failed: {type(e).__name__}: {text[:200]}") from None
    if isinstance(out, tuple):
        out = out[0]
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, t in out.items():
        name = key.removeprefix("transformer.")
        for pattern, _ in _PARTS:
            m = pattern.match(name)
            if m:
                break
        else:
            raise ValueError(f"the converter gave {key!r}")
        if _ROLE[m.group(2)] != "alpha":  # alpha = rank (neutral) where a converter passes it through
            parts[m.group(1)][_ROLE[m.group(2)]] = t
    if not parts or any(set(p) != {"down", "up"} for p in parts.values()):
        raise ValueError("the converter gave no LoRA for it")
    return {m: (p["down"], p["up"]) for m, p in parts.items()}


def _linear1(g: _Group, block: int, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[torch.Tensor, ...]]:
    """A FLUX single block's fused linear1 (q, k, v, MLP in) split at the model's sizes (see the module docstring)."""
    p = f"single_transformer_blocks.{block}."
    names = [p + "attn.to_q", p + "attn.to_k", p + "attn.to_v", p + "proj_mlp"]
    if not all(n in shapes for n in names):
        raise ValueError(f"the model has no single block {block}")
    sizes = [shapes[n][1] for n in names]
    down, up = g.tensors["down"], g.tensors["up"]
    if down.shape[1] != shapes[names[0]][0]:
        raise _WidthMismatch(g, f"in_features {down.shape[1]} but the model's {names[0]} has {shapes[names[0]][0]}")
    if up.shape[0] != sum(sizes):
        raise _WidthMismatch(g, f"out_features {up.shape[0]} but the model's {p}attn.to_q/to_k/to_v/proj_mlp have "
                             f"{'+'.join(map(str, sizes))} = {sum(sizes)}")
    return {n: (down, u) for n, u in zip(names, torch.split(up, sizes, dim=0))}


class _WidthMismatch(Exception):
    def __init__(self, group: _Group, what: str):
        super().__init__(what)
        self.group, self.what = group, what


def _convert(file: Path, groups: list[_Group], arch: str, pipeline_class: str, shapes: dict[str, tuple[int, int]],
             problems: list) -> dict[_Group, tuple[dict, Optional[float]]]:
    """Each group's layers ({module: (down, up)}) and scale (alpha / rank, or None without alpha); groups that do
    not convert go to `problems`; groups giving the same layer: _merge_clashing."""
    loader = _loader(pipeline_class)
    result: dict[int, tuple[_Group, dict, Optional[float]]] = {}
    for g in groups:
        scale = None
        if "alpha" in g.tensors:
            scale = float(g.tensors["alpha"].item()) / g.tensors["down"].shape[0]
        try:
            m = _LINEAR1.match(g.stem) if arch == "flux" and g.spelling is None else None
            outputs = _linear1(g, int(m.group(1)), shapes) if m else _run_converter(loader, _feed(g, arch))
        except ValueError as e:
            problems.append((g.file_keys, f"cannot be converted ({e})", _query(g.stem)))
            continue
        result[id(g)] = (g, outputs, scale)

    by_module: dict[str, list[int]] = defaultdict(list)
    for gid, (_, outputs, _) in result.items():
        for module in outputs:
            by_module[module].append(gid)
    clashing = {gid for gids in by_module.values() if len(gids) > 1 for gid in gids}
    if clashing:
        _merge_clashing(file, clashing, result, arch, loader)
    return {g: (outputs, scale) for g, outputs, scale in result.values()}


def _merge_clashing(file: Path, clashing: set[int], result: dict, arch: str, loader) -> None:
    """Groups that give the same layers: converted together where all are in the `.lora.down` spelling (alphas
    folded in by the converter), else, or if the converter cannot or gives other layers than the groups did apart,
    LoraError naming the keys and the layers."""
    clashing = sorted(clashing, key=list(result).index)  # in file order
    parts: dict[int, list[int]] = defaultdict(list)  # groups joined by the layers they share
    owner: dict[str, int] = {}
    for gid in clashing:
        for module in result[gid][1]:
            owner.setdefault(module, gid)
    # union-find over groups sharing a layer
    parent = {gid: gid for gid in clashing}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for gid in clashing:
        for module in result[gid][1]:
            parent[find(gid)] = find(owner[module])
    for gid in clashing:
        parts[find(gid)].append(gid)
    for gids in parts.values():
        members = [result[gid][0] for gid in gids]
        keys = [k for g in members for k in g.file_keys]
        wanted = {m for gid in gids for m in result[gid][1]}
        fed = {}
        for g in members:
            fed.update(_feed(g, arch, with_alpha=True))
        outputs, error = {}, ""
        if all(g.spelling == "dot" for g in members):
            try:
                outputs = _run_converter(loader, fed)
            except ValueError as e:
                error = str(e)
        if set(outputs) != wanted:
            clash = sorted(m for m in wanted if sum(m in result[gid][1] for gid in gids) > 1)
            raise LoraError(f"LoRA {file} holds {', '.join(clash)} twice: keys {', '.join(keys)}"
                            f"{f' ({error})' if error else ''}. Remove one of them, or use another release of it.")
        for gid in gids[1:]:
            del result[gid]
        result[gids[0]] = (_Joined(members), outputs, None)


class _Joined(_Group):
    """Several groups converted as one (their alphas folded in by the converter)."""

    def __init__(self, members: list[_Group]):
        super().__init__(members[0].stem, spelling="joined")
        self.members = members

    @property
    def file_keys(self) -> list[str]:
        return [k for g in self.members for k in g.file_keys]

    @property
    def key(self) -> str:
        return self.members[0].key


def _width_error(file: Path, g: _Group, what: str, made: str) -> LoraError:
    return LoraError(f"LoRA {file} does not fit this model: key {g.key!r} has {what}. It was made for a {made} "
                     "transformer of another size (e.g. the full-size model, where this one is smaller): use a LoRA "
                     "trained for this model.")


# ----------------------------------------------------------------------------------------------- scales and checks


def _peft_config(metadata: dict[str, str], file: Path) -> Optional[dict[str, Any]]:
    """The LoraConfig a diffusers/PEFT file was saved with, if any (see the module docstring)."""
    config = None
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            config = json.loads(raw)
        except ValueError:
            config = None
        if isinstance(config, dict) and any(k.startswith("transformer.") for k in config):
            config = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    elif file.name == "adapter_model.safetensors" and (file.parent / "adapter_config.json").is_file():
        try:
            config = json.loads((file.parent / "adapter_config.json").read_text())
        except (OSError, ValueError):
            config = None
    if not isinstance(config, dict) or "lora_alpha" not in config:
        return None
    return config


def _pattern(patterns: dict[str, Any], module: str):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):  # PEFT's get_pattern_key
            return value
    return None


def _peft_scale(config: dict[str, Any], module: str, rank: int) -> float:
    alpha = _pattern(config.get("alpha_pattern"), module)
    alpha = float(config["lora_alpha"] if alpha is None else alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _check_shapes(file: Path, layers: dict[str, LoraLayer], sources: dict[str, _Group],
                  shapes: dict[str, tuple[int, int]], arch: str, found: Optional[str]) -> None:
    for module, layer in layers.items():
        g = sources[module]
        if layer.down.shape[0] != layer.up.shape[1]:
            raise LoraError(f"LoRA {file}: key {g.key!r} ({module}): down has rank {layer.down.shape[0]} but up has "
                            f"{layer.up.shape[1]}; the file is corrupt.")
        if module not in shapes:
            continue
        have = shapes[module]
        for what, n, want in (("in_features", layer.down.shape[1], have[0]), ("out_features", layer.up.shape[0],
                                                                              have[1])):
            if n != want:
                raise _width_error(file, g, f"{what} {n} but the model's {module} has {want}", found or arch)


def _unknown_message(file: Path, arch: str, problems: list, shapes: dict[str, tuple[int, int]]) -> str:
    names = list(shapes)
    lines = []
    for keys, what, query in problems[:8]:
        near = difflib.get_close_matches(query, names, n=3, cutoff=0.0)
        lines.append(f"  {keys[0]}: {what}; nearest layers: {', '.join(near)}")
    more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
    n = sum(len(k) for k, _, _ in problems)
    return (f"LoRA {file}: {n} key(s) match no layer of this {arch} transformer:\n" + "\n".join(lines) + more
            + "\nUse a LoRA made for this model, or set lora.strict=false to skip such keys (they are then listed "
            "as ignored).")
