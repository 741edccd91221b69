"""Put LoRAs on a transformer, 4-bit or 16-bit, and take them off again exactly.

Why this way: an SVDQuant layer already has a 16-bit low-rank branch (y = W4A4(x̂) + (x + shift)·proj_down·proj_upᵀ
+ b), so a LoRA's delta W = scale·up·down joins it as extra rank: its down rows become new proj_down columns, its
strength·scale·up new proj_up columns. The 4-bit weights are never touched and nothing is re-quantized, so putting
a LoRA on costs a concatenation and taking it off restores the very tensors the layer had. Per module kind:

- SVDQW4A4Linear: the branch runs on the raw input (proj_down is stored pre-divided by the smoothing factor, see
  layers.py), so the LoRA's down goes in as it is, never scaled by `smooth` (each rank component's down and up
  only rescaled by a power of two to like norms, for fp16 factors). The branch sees x + act_shift (the
  unsigned-activation shift of layers after GELU): the constant that adds, shift·up·down·1, is taken off the bias
  (held in fp32 then, which the kernels and the reference read as fp32 anyway). The added rank is zero-padded so
  the layer's rank stays a multiple of 16 (LOW_RANK_MULTIPLE: Nunchaku's 16x16 low-rank tiles; the Triton kernels
  take any rank, masked to a power-of-two block of at least 16; zero columns add exact zeros).
- q/k/v quantized as one layer (`attn.to_qkv`, `attn.to_added_qkv`, in equal thirds) or as row slices sharing one
  proj_down: the LoRAs of to_q, to_k, to_v share the new proj_down columns (their downs concatenated along the
  rank) and each fills only its own rows of the new proj_up columns.
- SplitInputLinear (FLUX single blocks' proj_out): the down's input columns are split between the attention half
  and the MLP half, each half getting the full up: the two halves' outputs sum to the full delta.
- AWQW4A16Linear (AdaLN modulation, held in diffusers' row order: the checkpoint reader deinterleaves it): a
  16-bit side branch, a forward hook adding x·downᵀ·upᵀ (strength·scale folded into up) in fp32 before the
  output's one rounding; its tensors are non-persistent buffers, so they follow the module's device.
- nn.Linear (layers that stay 16-bit: embedders, norm_out, proj_out, everything of an unquantized model): merged,
  W + strength·scale·(up·down) computed in fp32 and rounded once to the weight's dtype (diffusers' fuse_lora); the
  original tensor is kept and put back on remove, bit for bit (reversible=False keeps nothing: a merge for good,
  e.g. before quantizing).

The LoRAs are put on in a canonical order (sha256, then strength), so the order a user lists them in never
changes a bit of the output; a LoRA at strength 0 is left out, and an empty set leaves every layer as it was.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from pipeline.errors import LoraError
from pipeline.lora import LoraWeights
from pipeline.quantization.layers import AWQW4A16Linear, SplitInputLinear, SVDQW4A4Linear

LOW_RANK_MULTIPLE = 16  # an SVDQuant layer's rank after LoRAs join its branch is a multiple of this
_STATE = "_lora_state"  # the transformer's attribute holding what apply_loras changed
_SIDE_DOWN, _SIDE_UP = "lora_side_down", "lora_side_up"  # an AWQ layer's side branch (non-persistent buffers)


@dataclass
class _Piece:
    """One LoRA layer's share of one module: delta = factor · up @ down on the module's output rows `rows`."""

    down: torch.Tensor  # (r, in_features of the module) fp32
    up: torch.Tensor  # (rows, r) fp32, without the factor
    factor: float  # strength · scale
    rows: tuple[int, int]  # the module's output rows this piece covers
    lora: str  # the LoRA's name (report)
    seq: int = 0  # routing order: the canonical order of LoRAs, then of their layers' paths


@dataclass
class _State:
    """What apply_loras changed, to undo exactly; and its report."""

    tensors: list[tuple[nn.Module, str, Optional[torch.Tensor]]] = field(default_factory=list)  # buffers replaced
    weights: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)  # merged 16-bit weights
    ranks: list[tuple[SVDQW4A4Linear, int]] = field(default_factory=list)
    hooks: list[tuple[nn.Module, Any]] = field(default_factory=list)  # AWQ side branches
    irreversible: int = 0  # merges done without keeping the original (reversible=False)
    report: dict[str, Any] = field(default_factory=dict)


def apply_loras(transformer: nn.Module, loras: list[tuple[LoraWeights, float]], reversible: bool = True) -> dict:
    """Put `loras` ((LoraWeights, strength) pairs) on `transformer`, replacing any set it holds; returns the report
    (lora_report). reversible=False merges 16-bit weights without keeping their originals (no memory for them; the
    set can then not be taken off)."""
    _refuse_streaming(transformer)
    loras = [(w, float(s)) for w, s in loras]
    active = sorted(((w, s) for w, s in loras if s != 0.0), key=lambda p: (p[0].sha256, p[1]))
    pieces: dict[int, list[_Piece]] = {}
    modules: dict[int, nn.Module] = {}
    seq = itertools.count()
    for weights, strength in active:  # everything checked before anything changes
        for path in sorted(weights.layers):
            layer = weights.layers[path]
            module, rows = _resolve(transformer, path)
            _check_shapes(path, layer, module, rows)
            _route(module, rows, layer.down.float(), layer.up.float(), strength * layer.scale, weights.name, pieces,
                   modules, seq)
    remove_loras(transformer)
    state = _State()
    names = {id(m): n for n, m in transformer.named_modules()}
    with torch.no_grad():
        touched: dict[str, dict[str, Any]] = {}
        sharing: dict[int, list[SVDQW4A4Linear]] = {}  # parts of one fused layer share one proj_down tensor
        for m in transformer.modules():
            if isinstance(m, SVDQW4A4Linear):
                sharing.setdefault(id(m.proj_down), []).append(m)
        units: dict[int, list[SVDQW4A4Linear]] = {}
        for key, module in modules.items():
            if isinstance(module, SVDQW4A4Linear):  # extended together, so that they still share it
                units[id(module.proj_down)] = sharing[id(module.proj_down)]
            elif isinstance(module, AWQW4A16Linear):
                touched[names[key]] = _side_branch(module, pieces[key], state)
            else:
                touched[names[key]] = _merge(module, pieces[key], state, reversible)
        for parts in units.values():
            touched.update(_extend_low_rank(sorted(parts, key=lambda m: m.rows[0]), pieces, names, state))
    state.report = {
        "loras": [{"name": w.name, "sha256": w.sha256, "strength": s, "layers": len(w.layers)} for w, s in active],
        "left_out": [{"name": w.name, "sha256": w.sha256} for w, s in loras if s == 0.0],
        "modules": dict(sorted(touched.items())),
        "rank_added": sum(m["rank"] for m in touched.values()),
    }
    setattr(transformer, _STATE, state)
    return lora_report(transformer)


def remove_loras(transformer: nn.Module) -> None:
    """Take the LoRAs off: every tensor, rank and hook as it was before apply_loras (bit for bit)."""
    state: Optional[_State] = getattr(transformer, _STATE, None)
    if state is None:
        return
    if state.irreversible:
        raise LoraError(f"the LoRAs were merged into {state.irreversible} 16-bit weight(s) for good "
                        "(apply_loras(reversible=False)); they cannot be taken off: rebuild the transformer")
    _refuse_streaming(transformer)
    moved: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def where_now(original: torch.Tensor, now: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The original on the device its replacement is on now, in `dtype`: the model may have moved (or, its
        16-bit weights, been cast) since."""
        device = original.device if now is None else now.device
        if original.device == device and original.dtype == dtype:
            return original
        key = (id(original), device, dtype)  # one copy per original: tensors shared by parts stay shared
        if key not in moved:
            moved[key] = original.to(device=device, dtype=dtype)
        return moved[key]

    with torch.no_grad():
        for module, hook in state.hooks:
            hook.remove()
            for name in (_SIDE_DOWN, _SIDE_UP):
                module._buffers.pop(name, None)
        for module, name, original in state.tensors:  # quantized layers' buffers keep their dtypes
            value = None if original is None else where_now(original, getattr(module, name), original.dtype)
            setattr(module, name, value)
        for param, original in state.weights:
            param.data = where_now(original, param.data, param.dtype)
        for module, rank in state.ranks:
            module.rank = rank
    delattr(transformer, _STATE)


def lora_report(transformer: nn.Module) -> dict:
    """What the LoRAs on `transformer` touched, for run.json: the LoRAs (canonical order, with strengths), those left
    out (strength 0), and per module (its path in the transformer) how (low-rank | side-branch | merged), the rank
    added (padding included) and which LoRAs; {} without LoRAs."""
    state: Optional[_State] = getattr(transformer, _STATE, None)
    return {} if state is None else dict(state.report)


# ---------- where a LoRA layer goes ----------

def _refuse_streaming(transformer: nn.Module) -> None:
    from pipeline.models.block_offload import _STREAMERS

    if transformer in _STREAMERS:
        raise LoraError("LoRAs are put on or taken off before the transformer's blocks stream (block offload "
                        "holds copies of their tensors): remove the streamer first, or apply them before placement")


def _resolve(transformer: nn.Module, path: str) -> tuple[nn.Module, Optional[tuple[int, int]]]:
    """The module a LoRA layer keyed by a diffusers path acts on, and its output rows there (None: all): the
    module itself, or its third of a fused q/k/v layer."""
    from pipeline.quantization.fused_qkv import FUSED_NAMES

    try:
        module = transformer.get_submodule(path)
    except AttributeError:
        module = None
    if module is not None:
        if not isinstance(module, (nn.Linear, SVDQW4A4Linear, AWQW4A16Linear, SplitInputLinear)):
            raise LoraError(f"LoRA layer {path!r}: {type(module).__name__} is not a linear layer a LoRA can act on")
        return module, None
    owner, _, leaf = path.rpartition(".")
    for leaves, fused_name in FUSED_NAMES.items():
        if leaf in leaves and owner:
            try:
                fused = transformer.get_submodule(f"{owner}.{fused_name}")
            except AttributeError:
                continue
            n, rest = divmod(fused.out_features, len(leaves))
            if rest:
                raise LoraError(f"LoRA layer {path!r}: the fused {owner}.{fused_name} ({fused.out_features} rows) "
                                f"is not {len(leaves)} equal parts")
            i = leaves.index(leaf)
            return fused, (i * n, (i + 1) * n)
    raise LoraError(f"LoRA layer {path!r}: the transformer has no such module (a LoRA for another model?)")


def _check_shapes(path: str, layer, module: nn.Module, rows: Optional[tuple[int, int]]) -> None:
    n = module.out_features if rows is None else rows[1] - rows[0]
    down, up = tuple(layer.down.shape), tuple(layer.up.shape)
    if len(down) != 2 or len(up) != 2 or down[1] != module.in_features or up != (n, down[0]):
        raise LoraError(f"LoRA layer {path!r}: down {down} and up {up} do not fit a layer of {module.in_features} "
                        f"inputs and {n} outputs (down: (rank, {module.in_features}), up: ({n}, rank))")


def _route(module: nn.Module, rows: Optional[tuple[int, int]], down: torch.Tensor, up: torch.Tensor, factor: float,
           lora: str, pieces: dict[int, list[_Piece]], modules: dict[int, nn.Module], seq: Iterator[int]) -> None:
    """Give each module its piece; a split-input layer's halves each take their input columns of the down."""
    if isinstance(module, SplitInputLinear):
        _route(module.first, rows, down[:, : module.split], up, factor, lora, pieces, modules, seq)
        _route(module.second, rows, down[:, module.split :], up, factor, lora, pieces, modules, seq)
        return
    modules[id(module)] = module
    pieces.setdefault(id(module), []).append(_Piece(down, up, factor, rows or (0, module.out_features), lora,
                                                    next(seq)))


def _entry(how: str, rank: int, ps: list[_Piece], **extra) -> dict[str, Any]:
    return {"how": how, "rank": rank, **extra, "loras": sorted({p.lora for p in ps})}


# ---------- per module kind ----------

def _merge(linear: nn.Module, ps: list[_Piece], state: _State, reversible: bool) -> dict[str, Any]:
    """16-bit: W + Σ factor·(up @ down) in fp32, rounded once to the weight's dtype; the original kept."""
    if not isinstance(linear, nn.Linear):
        raise LoraError(f"a LoRA cannot act on {type(linear).__name__} (split halves must be linear layers)")
    weight = linear.weight
    merged = weight.detach().float()  # a copy when the weight is 16-bit; cloned below when it is fp32
    if merged.data_ptr() == weight.data_ptr():
        merged = merged.clone()
    for p in ps:
        merged[p.rows[0] : p.rows[1]] += (p.up.to(merged.device) @ p.down.to(merged.device)) * p.factor
    if reversible:
        state.weights.append((weight, weight.data))
    else:
        state.irreversible += 1
    weight.data = merged.to(weight.dtype)
    return _entry("merged", sum(p.down.shape[0] for p in ps), ps)


def _stack(ps: list[_Piece], n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The pieces as one branch: downs along the rank (R, K), ups into their rows of (n, R), factor folded in."""
    down = torch.cat([p.down for p in ps]).to(device)
    up = torch.zeros(n, down.shape[0], device=device)
    start = 0
    for p in ps:
        r = p.down.shape[0]
        up[p.rows[0] : p.rows[1], start : start + r] = p.up.to(device) * p.factor
        start += r
    return down, up


def _side_branch(layer: AWQW4A16Linear, ps: list[_Piece], state: _State) -> dict[str, Any]:
    """4-bit weights, 16-bit activations: y + x·downᵀ·upᵀ, added in fp32 before the output's one rounding."""
    down, up = _stack(ps, layer.out_features, layer.packed_codes.device)
    layer.register_buffer(_SIDE_DOWN, down, persistent=False)
    layer.register_buffer(_SIDE_UP, up, persistent=False)
    state.hooks.append((layer, layer.register_forward_hook(_add_side_branch)))
    return _entry("side-branch", down.shape[0], ps)


def _add_side_branch(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    down, up = getattr(module, _SIDE_DOWN), getattr(module, _SIDE_UP)
    return (output.float() + (x.float() @ down.T) @ up.T).to(output.dtype)


def _extend_low_rank(parts: list[SVDQW4A4Linear], pieces: dict[int, list[_Piece]], names: dict[int, str],
                     state: _State) -> dict[str, dict[str, Any]]:
    """SVDQuant layers sharing one proj_down (one layer, or the row slices of a fused one): the LoRAs' downs become
    new proj_down columns (one tensor, still shared), each part's rows of the ups new proj_up columns, padded with
    zero columns to a rank that is a multiple of LOW_RANK_MULTIPLE; the input shift's constant comes off the bias."""
    first = parts[0]
    base = first.rows[0]
    ps = _canonical(parts, pieces, base)
    n = parts[-1].rows[1] - base
    device, old_rank = first.proj_down.device, first.proj_down.shape[1]
    down, up = _stack(ps, n, device)
    # each rank component's down and up scaled to like norms by a power of two (exact: their product is unchanged),
    # so neither lands in fp16's subnormals when the layer holds fp16 factors
    ratio = up.norm(dim=0) / down.norm(dim=1)
    ok = torch.isfinite(ratio) & (ratio > 0)
    balance = torch.where(ok, torch.exp2(torch.round(0.5 * torch.log2(torch.where(ok, ratio, 1.0)))), 1.0)
    down, up = down * balance[:, None], up / balance[None, :]
    added = down.shape[0]
    pad = -(old_rank + added) % LOW_RANK_MULTIPLE
    down16 = torch.cat([down.T, down.new_zeros(down.shape[1], pad)], dim=1).to(first.proj_down.dtype)
    up = torch.cat([up, up.new_zeros(n, pad)], dim=1)
    new_down = torch.cat([first.proj_down, down16], dim=1).contiguous()
    column_sums = down16.double().sum(0)  # what the branch adds per unit of a constant input
    report = {}
    for m in parts:
        lo, hi = m.rows[0] - base, m.rows[1] - base
        up16 = up[lo:hi].to(m.proj_up.dtype)
        state.tensors += [(m, "proj_down", m.proj_down), (m, "proj_up", m.proj_up)]
        state.ranks.append((m, m.rank))
        m.proj_down = new_down
        m.proj_up = torch.cat([m.proj_up, up16], dim=1).contiguous()
        m.rank = new_down.shape[1]
        if m.act_shift:  # the branch sees x + shift: take shift · up·down·1 off the bias
            constant = (up16.double() @ column_sums * float(m.act_shift)).float()
            bias = m.bias.float() if m.bias is not None else torch.zeros(m.out_features, device=device)
            state.tensors.append((m, "bias", m.bias))
            m.bias = bias - constant
        shared = {"shared_with": [names[id(o)] for o in parts if o is not m]} if len(parts) > 1 else {}
        report[names[id(m)]] = _entry("low-rank", added + pad, pieces.get(id(m), []), lora_rank=added, **shared)
    return report


def _canonical(parts: list[SVDQW4A4Linear], pieces: dict[int, list[_Piece]], base: int) -> list[_Piece]:
    """The unit's pieces in one order whatever the parts: by LoRA (canonical order) and path, as they were routed;
    rows moved to the unit's rows. Row slices of a fused layer so give the same branch as the fused layer."""
    moved = [_Piece(p.down, p.up, p.factor, (m.rows[0] - base + p.rows[0], m.rows[0] - base + p.rows[1]), p.lora,
                    p.seq) for m in parts for p in pieces.get(id(m), [])]
    return sorted(moved, key=lambda p: p.seq)
