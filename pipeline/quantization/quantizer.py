"""Post-training SVDQuant of one linear layer, and AWQ-format W4A16 for modulation layers.

Per layer: smooth activations into the weights (λ_j = max|x_j|^α / max|W_j|^(1−α), α searched on a
grid to minimise the layer's output error on calibration rows), keep the top-r singular components
of the smoothed weight as a 16-bit branch, quantize the residual to 4 bits (round-to-nearest).
Every 16-bit tensor is rounded to its storage dtype before the residual is taken, so what is
evaluated here is exactly what a saved file reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from pipeline.quantization import numerics as nx
from pipeline.quantization.layers import AWQW4A16Linear, SVDQW4A4Linear

DEFAULT_ALPHAS = tuple(round(a * 0.1, 1) for a in range(11))


@dataclass
class ActStats:
    """What calibration learned about a layer's input: per-channel |max| and a sample of rows."""

    absmax: torch.Tensor  # (K,) fp32
    sample: torch.Tensor  # (m, K) fp32, raw inputs (before any shift)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    alpha: Optional[float]
    rel_error: float
    unsigned: bool

    def to_dict(self) -> dict:
        return {"name": self.name, "out_features": self.shape[0], "in_features": self.shape[1],
                "alpha": self.alpha, "rel_error": self.rel_error, "act_unsigned": self.unsigned}


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-12))


def svdquant_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], stats: ActStats, *, precision: str,
                    rank: int, act_unsigned: bool = False, smooth: bool = True,
                    alphas: Sequence[float] = DEFAULT_ALPHAS, dtype16: torch.dtype = torch.bfloat16,
                    name: str = "") -> tuple[SVDQW4A4Linear, LayerReport]:
    """Quantize W (N, K) with SVDQuant; returns the layer with the lowest calibration error."""
    w = weight.detach().float()
    shift = nx.GELU_SHIFT if act_unsigned else 0.0
    x = stats.sample.float()
    ref = x @ w.T + (bias.float() if bias is not None else 0.0)
    absx = (stats.absmax.float() + shift).clamp_min(1e-5)
    absw = w.abs().amax(0).clamp_min(1e-5)
    best: tuple[float, Optional[float], SVDQW4A4Linear] | None = None
    for alpha in (alphas if smooth else (None,)):
        lam = torch.ones_like(absx) if alpha is None else (absx**alpha / absw ** (1 - alpha)).clamp(1e-4, 1e4)
        layer = _build(w, bias, lam, precision=precision, rank=rank, unsigned=act_unsigned, shift=shift,
                       dtype16=dtype16, name=name)
        err = relative_error(layer(x), ref)
        if best is None or err < best[0]:
            best = (err, alpha, layer)
    err, alpha, layer = best
    return layer, LayerReport(name, tuple(w.shape), alpha, err, act_unsigned)


def _build(w, bias, lam, *, precision, rank, unsigned, shift, dtype16, name) -> SVDQW4A4Linear:
    smooth16 = lam.to(dtype16)
    lam = smooth16.float()
    w_hat = w * lam[None, :]
    if rank > 0:
        u, s, vh = torch.linalg.svd(w_hat, full_matrices=False)
        proj_up = (u[:, :rank] * s[:rank]).to(dtype16).contiguous()  # (N, r)  = L2ᵀ
        proj_down = (vh[:rank].T / lam[:, None]).to(dtype16).contiguous()  # (K, r) = L1 / λ, applied to raw x
        low = proj_up.float() @ (proj_down.float() * lam[:, None]).T
    else:
        proj_up = torch.zeros(w.shape[0], 0, dtype=dtype16)
        proj_down = torch.zeros(w.shape[1], 0, dtype=dtype16)
        low = torch.zeros_like(w_hat)
    codes, scales, tscale = nx.quantize_weight(w_hat - low, precision, dtype16)
    if bias is not None or shift:
        b = bias.detach().float() if bias is not None else torch.zeros(w.shape[0])
        bias16 = (b - w @ torch.full((w.shape[1],), shift)).to(dtype16)  # fold the input shift
    else:
        bias16 = None
    extra = {}
    if precision == "nvfp4":
        extra = {"wtscale": tscale, "wcscales": torch.ones(w.shape[0], dtype=dtype16)}
    return SVDQW4A4Linear(precision=precision, qweight=codes, wscales=scales, smooth=smooth16,
                          proj_down=proj_down, proj_up=proj_up, bias=bias16, act_unsigned=unsigned,
                          act_shift=shift, ckpt_name=name, **extra)


def awq_w4a16(weight: torch.Tensor, bias: Optional[torch.Tensor], *, fold: Optional[torch.Tensor] = None,
              dtype16: torch.dtype = torch.bfloat16, name: str = "") -> AWQW4A16Linear:
    """Asymmetric 4-bit weights per 64-group (round-to-nearest), 16-bit scales and zeros.

    `fold` (N,) is what the checkpoint adds to the bias (AdaLN's "+1" on scale rows); the bias is
    snapped so that bias + fold is exact in dtype16, so a saved file reproduces this layer exactly.
    """
    w = weight.detach().float()
    n, k = w.shape
    wg = w.reshape(n, k // nx.INT4_GROUP, nx.INT4_GROUP)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo) / 15.0).to(dtype16)
    zeros = lo.to(dtype16)
    s = scales.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round((wg - zeros.float().unsqueeze(-1)) / torch.where(s > 0, s, 1.0)), 0.0)
    q = q.clamp(0, 15).to(torch.uint8).reshape(n, k)
    b = bias.detach().float() if bias is not None else torch.zeros(n)
    f = fold if fold is not None else torch.zeros(n)
    b = (b + f).to(dtype16).float() - f
    return AWQW4A16Linear(qweight=q, wscales=scales, wzeros=zeros, bias=b, ckpt_name=name)
