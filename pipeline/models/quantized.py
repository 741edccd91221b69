"""A run's transformer straight from a quantized file: its config, the meta device, then the file's tensors.

Why: loading the 16-bit pipeline first and swapping its transformer afterwards reads (and holds) the 16-bit
transformer, 24 GB for FLUX.1-dev and 41 GB for Qwen-Image, which is what a 4-bit run exists to avoid. Here the
transformer is built empty from its config (`model.path/transformer/config.json`, or the file's own `config`
metadata when the folder has none), every tensor comes from the file, and the 16-bit weights need not exist.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from pipeline.config.schema import ModelConfig, ModelSource
from pipeline.errors import ModelNotFoundError, QuantizationError
from pipeline.quantization.file_info import CheckpointInfo, config_mismatches

log = logging.getLogger("pipeline")
def transformer_class(family: str):
    """The diffusers transformer class of a model family."""
    import diffusers

    from pipeline.families import family as get_family

    return getattr(diffusers, get_family(family).architecture.transformer_class)


def transformer_config(model: ModelConfig, info: Optional[CheckpointInfo] = None) -> tuple[dict[str, Any], str]:
    """The run's transformer config and where it came from: the tiny spec, the model folder, or the file's metadata."""
    if model.source == ModelSource.tiny:
        from pipeline.models.tiny import tiny_transformer_config

        return tiny_transformer_config(model.family, model.tiny), f"the built-in {model.name}"
    from pipeline.models.pretrained import resolve_model_dir

    folder = resolve_model_dir(model)
    path = folder / "transformer" / "config.json"
    if path.is_file():
        return json.loads(path.read_text()), str(path)
    if info is not None and info.config:
        return info.config, f"{info.path} (its 'config' metadata)"
    where = f"; {info.path} carries no 'config' metadata either" if info is not None else ""
    raise ModelNotFoundError(
        f"{path}: no such file{where}, so the {model.name} transformer cannot be built. Copy the base model's "
        f"transformer/config.json into {folder / 'transformer'} (the weights are not needed with a quantized file).")


def check_file_fits(model: ModelConfig, info: CheckpointInfo) -> None:
    """Refuse, before anything is loaded, a file made for another model family or another transformer shape."""
    from pipeline.families import family as get_family

    arch = get_family(model.family).architecture.name
    if info.family and info.family != arch:
        raise QuantizationError(
            f"{info.path} holds a {info.family} transformer (by its tensor names) but model={model.name} is a "
            f"{model.family} model ({arch} transformer). Use a {arch} svdq-* file made for {model.name}, or choose "
            "the model the file was made for.")
    if not info.config:
        return
    expected, source = transformer_config(model, None if model.source == ModelSource.tiny else info)
    if source.startswith(info.path):
        return  # the file's own config is the only one there is
    wrong = config_mismatches(info.config, expected)
    if wrong:
        raise QuantizationError(
            f"{info.path} was made for another transformer than {model.name}'s ({source}): " + "; ".join(wrong)
            + ". Use the svdq-* file made for this model, or point model.path at the model the file was made for.")


def meta_transformer(family: str, config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """The transformer with its parameters on the meta device (no memory), in `dtype`."""
    from accelerate import init_empty_weights

    from pipeline.models.build import quiet_diffusers

    with init_empty_weights(), quiet_diffusers():
        transformer = transformer_class(family).from_config(config).to(dtype)
    return transformer.eval()


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters (on the meta device too: shapes and dtypes alone)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def transformer_bytes_16bit(model: ModelConfig, dtype: torch.dtype = torch.bfloat16,
                            info: Optional[CheckpointInfo] = None) -> int:
    """What the 16-bit transformer's weights would take, computed on the meta device."""
    config, _ = transformer_config(model, info)
    return parameter_bytes(meta_transformer(model.family, config, dtype))


class QuantizedTransformer(NamedTuple):
    transformer: nn.Module
    layers: list[str]  # the quantized layers installed from the file
    bytes_16bit: int  # what the transformer would hold in 16 bits (measured on the meta device before filling)


def build_quantized_transformer(model: ModelConfig, path: str | Path, info: CheckpointInfo, dtype: torch.dtype,
                                act_unsigned: bool) -> QuantizedTransformer:
    """Build the transformer empty from its config and fill every tensor from the file."""
    from pipeline.quantization.checkpoint import load_checkpoint

    config, source = transformer_config(model, info)
    log.info("building the %s transformer from %s, weights from %s", model.name, source, path)
    transformer = meta_transformer(model.family, config, dtype)
    bytes_16bit = parameter_bytes(transformer)
    names = load_checkpoint(transformer, path, info, act_unsigned=act_unsigned)
    empty = [n for n, t in list(transformer.named_parameters()) + list(transformer.named_buffers()) if t.is_meta]
    if empty:
        raise QuantizationError(f"{path}: no tensor for {', '.join(empty[:8])}: the file does not fill this model")
    return QuantizedTransformer(transformer, names, bytes_16bit)
