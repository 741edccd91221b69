"""Swap a diffusers transformer's linears for quantized ones (and find them again for saving)."""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import nn

from pipeline.quantization.fused_block import install_fused_block
from pipeline.quantization.fused_mlp import install_fused_mlp
from pipeline.quantization.fused_norm import install_fused_norm
from pipeline.quantization.fused_qkv import install_fused_qkv
from pipeline.quantization.layers import AWQW4A16Linear, SplitInputLinear, SVDQW4A4Linear
from pipeline.quantization.quantizer import ActStats, LayerReport, awq_w4a16, relative_error, svdquant_linear
from pipeline.quantization.targets import Target

log = logging.getLogger("pipeline")
QUANTIZED_TYPES = (SVDQW4A4Linear, AWQW4A16Linear)


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    if isinstance(owner, (nn.ModuleList, nn.Sequential)):
        owner[int(leaf)] = module
    else:
        setattr(owner, leaf, module)


def target_weight(transformer: nn.Module, t: Target) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The (N, K) fp32 weight and bias a target quantizes: parts stacked on N, input cols sliced."""
    mods = [get_module(transformer, p) for p in t.parts]
    w = torch.cat([m.weight.detach().float() for m in mods])
    biases = [m.bias for m in mods]
    b = None if any(x is None for x in biases) else torch.cat([x.detach().float() for x in biases])
    if t.cols:
        w = w[:, t.cols[0] : t.cols[1]]
        if t.cols[0] > 0:
            b = None  # the full bias goes with the first input slice
    return w.cpu(), (b.cpu() if b is not None else None)


def modulation_fold(t: Target, n: int) -> torch.Tensor:
    """+1 on the AdaLN scale chunks: what Nunchaku files fold into the modulation bias."""
    fold = torch.zeros(n)
    size = n // t.mod_chunks
    for c in t.scale_chunks:
        fold[c * size : (c + 1) * size] = 1.0
    return fold


def install(transformer: nn.Module, t: Target, layer: nn.Module, pending: dict) -> None:
    """Put `layer` where `t` says: whole where the attention runs q/k/v fused, else split its rows over
    the parts; pair input halves. An MLP whose layers are both in place runs as a fused pair; an AdaLN-Zero
    whose modulation is in place runs its norm and modulation as one kernel."""
    if t.cols is not None:
        halves = pending.setdefault(t.parts[0], {})
        halves[t.cols[0]] = layer
        if len(halves) == 2:
            first, second = (halves[k] for k in sorted(halves))
            set_module(transformer, t.parts[0], SplitInputLinear(first, second))
            del pending[t.parts[0]]
            install_fused_mlp(transformer, t.parts[0])
        return
    if len(t.parts) == 1:
        set_module(transformer, t.parts[0], layer)
        if t.after_gelu:
            install_fused_mlp(transformer, t.parts[0])
        if t.kind == "awq":  # the AdaLN modulation: its norm + modulation become one kernel, its block's
            install_fused_norm(transformer, t.parts[0])  # gated sums go into GEMM epilogues
            install_fused_block(transformer, t.parts[0])
        return
    if isinstance(layer, SVDQW4A4Linear) and install_fused_qkv(transformer, t.parts, layer):
        return
    start = 0
    for path in t.parts:
        n = get_module(transformer, path).out_features
        set_module(transformer, path, slice_rows(layer, start, start + n))
        start += n


def slice_rows(layer: SVDQW4A4Linear, start: int, stop: int) -> SVDQW4A4Linear:
    """One part of a fused layer: its output rows, sharing the input side (smooth, proj_down)."""
    def rows(t):
        return None if t is None else t[start:stop]

    return SVDQW4A4Linear(
        precision=layer.precision, packed_codes=rows(layer.packed_codes), wscales=rows(layer.wscales),
        smooth=layer.smooth, smooth_orig=layer.smooth_orig, proj_down=layer.proj_down,
        proj_up=rows(layer.proj_up), bias=rows(layer.bias), wtscale=layer.wtscale,
        wcscales=rows(layer.wcscales), act_unsigned=layer.act_unsigned, act_shift=layer.act_shift,
        ckpt_name=layer.ckpt_name, rows=(layer.rows[0] + start, layer.rows[0] + stop),
    )


def quantize_model(transformer: nn.Module, targets: list[Target], stats: dict[str, ActStats], *,
                   precision: str, rank: int, act_unsigned: bool, dtype16: torch.dtype = torch.bfloat16,
                   alphas=None, on_layer: Optional[Callable[[int, int, LayerReport], None]] = None) -> list[LayerReport]:
    """Quantize every target in place; returns per-layer reports (error on the calibration rows)."""
    device = next(transformer.parameters()).device
    reports: list[LayerReport] = []
    pending: dict = {}
    for i, t in enumerate(targets):
        w, b = target_weight(transformer, t)
        if t.kind == "awq":
            layer = awq_w4a16(w, b, fold=modulation_fold(t, w.shape[0]), dtype16=dtype16, name=t.name)
            x = stats[t.name].sample if t.name in stats else torch.randn(64, w.shape[1])
            ref = x @ w.T + (b if b is not None else 0.0)
            report = LayerReport(t.name, tuple(w.shape), None, relative_error(layer(x), ref), False)
        else:
            kw = {} if alphas is None else {"alphas": alphas}
            layer, report = svdquant_linear(
                w, b, stats[t.name], precision=precision, rank=rank,
                act_unsigned=act_unsigned and t.after_gelu and precision == "int4",
                dtype16=dtype16, name=t.name, **kw)
        install(transformer, t, layer.to(device), pending)
        reports.append(report)
        if on_layer:
            on_layer(i + 1, len(targets), report)
    round_unquantized_(transformer, dtype16)
    return reports


def round_unquantized_(transformer: nn.Module, dtype16: torch.dtype) -> None:
    """Round every tensor outside the quantized layers to a dtype16 value (its dtype unchanged): a file holds them in
    16 bits, so the quantized model evaluated in-process is exactly the one its file reproduces."""
    quantized = tuple(f"{p}." for p, m in transformer.named_modules() if isinstance(m, QUANTIZED_TYPES + (SplitInputLinear,)))
    with torch.no_grad():
        for key, t in transformer.state_dict(keep_vars=True).items():
            if not key.startswith(quantized) and t.is_floating_point() and t.dtype != dtype16:
                t.copy_(t.to(dtype16))


def quantized_layers(transformer: nn.Module) -> dict[str, list[nn.Module]]:
    """ckpt name -> its modules (parts in row order), as installed in the transformer."""
    found: dict[str, list[nn.Module]] = {}
    for _, m in transformer.named_modules():
        if isinstance(m, QUANTIZED_TYPES):
            found.setdefault(m.ckpt_name, []).append(m)
    for parts in found.values():
        parts.sort(key=lambda m: getattr(m, "rows", (0, 0))[0])
    return found
