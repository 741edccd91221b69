"""Check every Triton kernel configuration a quantized transformer will use against the PyTorch reference, once
per device and process, and run the reference for any configuration whose kernel disagrees.

Why: the kernels are verified in Triton's interpreter; on a GPU they compile to code no test has run on that
architecture (inline PTX, tensor-core paths picked per compute capability, autotuned tiles). A wrong kernel
would spoil every image without an error. A fraction of a second per configuration buys the assurance.

What a configuration is: what the kernels compile differently for, as the call sites key it for dispatch.py
(`*_config`): an SVDQuant layer's call (precision, signed/unsigned/shifted activations, bias, NVFP4 channel
scales, epilogue: plain, + residual, gated residual, both; dtype), the joint q/k/v projection, the GELU MLP
(fc1 with GELU and fc2's quantization in its epilogue, then fc2), the AWQ GEMV, q/k RMSNorm + RoPE (norm kind,
table kind, weights) and AdaLN's LayerNorm + modulation, each per activation dtype. `plan` finds the ones a
model calls by walking its modules as their forwards call them.

How each is checked: a seeded random input (2 images of 5 text / 67 image tokens on a GPU, 3 / 13 in the
interpreter: rows ragged against every tile) through a real module of the model (its weights, K and rank: the
kernels compiled are the run's own), the kernel path against the reference path (the layers' reference_forward,
diffusers' ops). Error: max |kernel - reference| / max |reference|, within
  fp32 1e-5 (fp32 accumulation in another order), fp16 2e-3, bf16 1e-2 (2-4 steps of the output's rounding at
  its largest value: a gated output rounds three times). No output is bit-exact by construction on a GPU
  (contracted FMAs, TF32 splits of the low-rank branch, another summation order), so none is compared exactly.
The GELU MLP is checked in its two steps, since its GELU is not torch's to the last bit: fc2's activation
codes may be one step off in at most 0.1% of places (none two steps off), its scales are within the dtype's
tolerance, its fp32 low-rank input within 1e-3 (sums over the MLP width in another order); then fc2's GEMM on
those codes against the reference GEMM on the same codes.

Then: a passed configuration keeps its kernels. A failed one (a mismatch, or a kernel that does not compile
or launch here) runs the PyTorch reference from then on on this device (dispatch.disable), that one alone:
a fused path (joint q/k/v, GELU MLP, the fused q/k attention) falls back to its unfused calls, whose own
configurations are then checked too. Each failure logs one warning on logger "pipeline"; under
`quantization.strict=true` it raises KernelCheckError instead (naming the configuration, its error and
tolerance, and the fix). Where no kernel runs (the CPU without SVDQ_KERNELS=triton + TRITON_INTERPRET=1,
SVDQ_KERNELS=reference) it returns at once, skipped, with the reason. Results are cached per (device,
configuration) for the process: a second call runs nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import DeviceError
from pipeline.kernels import dispatch

log = logging.getLogger("pipeline")

SEED = 0
IMAGES = 2  # images per case: the gate's per-image rows, the joint tensor's per-image slices
# (text, image) tokens per image: rows ragged against every tile of a GPU's autotuned GEMMs (64-256 rows) and
# of the interpreter's (32), which runs every program in Python: fewer there
TOKENS = {"cuda": (5, 67), "interpreter": (3, 13)}
# max |kernel - reference| / max |reference| (module docstring)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CODE_STEPS = 1e-3  # fraction of fc2's activation codes the fused GELU may put one step off
LOW_TOLERANCE = 1e-3  # fc2's fp32 low-rank input, summed over the MLP width in another order

_RESULTS: dict[tuple[str, tuple], dict] = {}  # (device key, configuration) -> its entry, for the process


class KernelCheckError(DeviceError):
    """A Triton kernel configuration disagrees with the PyTorch reference on this device (quantization.strict).
    `record` holds self_check's record for run.json."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


class _Skip(Exception):
    """This configuration's kernel does not run here (the reason)."""


Part = tuple[str, float, float]  # (what was compared, error, tolerance)


@dataclass
class Check:
    """One configuration: `run` compares the kernel with the reference; `fallback` are the checks of the calls a
    fused path makes instead once it is disabled."""

    config: tuple
    run: Callable[[torch.device, torch.dtype], list[Part]]
    fallback: tuple["Check", ...] = ()
    modules: tuple[nn.Module, ...] = ()  # what `run` calls: on the device for the check, wherever they live


def config_name(config: tuple) -> str:
    """'w4a4_linear[int4 signed bias, gated, bfloat16]': the configuration key, readable."""
    def word(part) -> str:
        if isinstance(part, torch.dtype):
            return str(part).rpartition(".")[2]
        if isinstance(part, tuple):
            return " | ".join(word(p) for p in part) if part and isinstance(part[0], tuple) else " ".join(part)
        return str(part)

    return f"{config[0]}[{', '.join(word(p) for p in config[1:])}]"


# ---------- comparisons ----------

def _error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (NaN where got is not finite or the shapes differ)."""
    if got.shape != ref.shape:
        return math.nan
    scale = ref.float().abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return float((got.float() - ref.float()).abs().max() / scale)


def _inputs(g: torch.Generator, shape: tuple, device: torch.device, dtype: torch.dtype,
            unsigned: bool = False) -> torch.Tensor:
    """Seeded activations (drawn on the CPU: the same on every device); GELU outputs for unsigned layers."""
    x = torch.randn(*shape, generator=g)
    if unsigned:
        x = F.gelu(x, approximate="tanh")
    return x.to(device, dtype)


def _tokens(device: torch.device) -> tuple[int, int]:
    """(text, image) tokens per image of the cases on this device."""
    return TOKENS["cuda" if device.type == "cuda" else "interpreter"]


def _epilogue_inputs(g, n: int, device, dtype, residual: bool, gated: bool):
    """(residual, gate, gated_residual) for an output (IMAGES, image tokens, n), each None where not used."""
    rows = (IMAGES, _tokens(device)[1], n)
    res = _inputs(g, rows, device, dtype) if residual else None
    gate = _inputs(g, (IMAGES, n), device, dtype) if gated else None
    gres = _inputs(g, rows, device, dtype) if gated else None
    return res, gate, gres


# ---------- one check per kind of configuration ----------

def _linear(layer: nn.Module, dtype: torch.dtype, residual: bool = False, gated: bool = False) -> Check:
    """An SVDQuant layer through its forward (the kernels) and its reference_forward."""
    from pipeline.quantization.layers import gated as gated_sum

    def run(device, dtype):
        if dispatch.kernel_mode(device, layer.precision) == "reference":
            raise _Skip(f"{layer.precision} layers run the PyTorch reference on this device")
        g = torch.Generator().manual_seed(SEED)
        x = _inputs(g, (IMAGES, _tokens(device)[1], layer.in_features), device, dtype, layer.act_unsigned)
        res, gate, gres = _epilogue_inputs(g, layer.out_features, device, dtype, residual, gated)
        got = layer(x, residual=res, gate=gate, gated_residual=gres)
        ref = gated_sum(layer.reference_forward(x, res), gate, gres)
        return [("output", _error(got, ref), TOLERANCE[dtype])]

    return Check(dispatch.w4a4_config(layer, dtype, residual, gated), run, modules=(layer,))


def _joint(layers: tuple, dtype: torch.dtype, fallback: tuple) -> Check:
    """The text and image projections written into one joint tensor, against the layers' references joined."""
    from pipeline.quantization.layers import joint_linear

    def run(device, dtype):
        if dispatch.int4_dot(device) is None:
            raise _Skip("INT4 layers run the PyTorch reference on this device")
        g = torch.Generator().manual_seed(SEED)
        xs = tuple(_inputs(g, (IMAGES, tokens, m.in_features), device, dtype, m.act_unsigned)
                   for m, tokens in zip(layers, _tokens(device)))
        got = joint_linear(layers, xs)
        if got is None:
            raise _Skip("these layers do not run as one joint projection")
        ref = torch.cat([m.reference_forward(x) for m, x in zip(layers, xs)], dim=1)
        return [("output", _error(got, ref), TOLERANCE[dtype])]

    return Check(dispatch.joint_config(layers, dtype), run, fallback, modules=tuple(layers))


def _reference_act(layer: nn.Module, x: torch.Tensor):
    """A layer's input as its reference_forward quantizes it: (codes, scales, low-rank down projection)."""
    from pipeline.quantization import numerics as nx

    shifted = x + layer.act_shift if layer.act_shift else x
    codes, scales = nx.quantize_act(shifted / layer.smooth.to(x.dtype), layer.precision, layer.act_unsigned)
    return codes, scales, shifted.float() @ layer.proj_down.float()


def _reference_gemm(layer: nn.Module, codes, scales, low, dtype, residual=None) -> torch.Tensor:
    """An INT4 layer's reference_forward GEMM and epilogue on an input quantized already -> (rows, N) in dtype."""
    from pipeline.quantization import numerics as nx

    out = nx.w4a4_matmul(codes, scales, layer.qweight, layer.wscales, layer.precision)
    if layer.bias is not None:
        out = out + layer.bias.float()
    out = out + low @ layer.proj_up.float().T
    if residual is not None:
        out = out + residual.reshape(-1, layer.out_features).float()
    return out.to(dtype)


def _gelu_mlp(fc1: nn.Module, fc2: nn.Module, dtype: torch.dtype, residual: bool, gated: bool,
              fallback: tuple) -> Check:
    """fc1 + GELU + fc2's quantization (svdq::w4a4_gelu_quant) against fc1's reference, torch's GELU and fc2's
    reference quantization; then the MLP through gelu_mlp against fc2's reference GEMM on the kernel's codes."""
    from pipeline.kernels import ops
    from pipeline.kernels.triton_w4a4 import natural_order
    from pipeline.quantization.fused_mlp import gelu_mlp
    from pipeline.quantization.layers import gated as gated_sum

    def run(device, dtype):
        dot = dispatch.int4_dot(device)
        if dot is None:
            raise _Skip("INT4 layers run the PyTorch reference on this device")
        g = torch.Generator().manual_seed(SEED)
        x = _inputs(g, (IMAGES, _tokens(device)[1], fc1.in_features), device, dtype, fc1.act_unsigned)
        res, gate, gres = _epilogue_inputs(g, fc2.out_features, device, dtype, residual, gated)
        x2 = x.reshape(-1, fc1.in_features)
        codes, scales, low = ops.w4a4_gelu_quant(
            x2, fc1.packed_codes, fc1.wscales, fc1.smooth, fc1.proj_down, fc1.proj_up, fc1.bias,
            float(fc1.act_shift), fc1.act_unsigned, fc2.smooth, fc2.proj_down, float(fc2.act_shift),
            fc2.act_unsigned, dot)
        codes, scales = natural_order(codes), scales.t()  # (M, N) integer codes, (M, N/64) scales
        ref_codes, ref_scales, ref_low = _reference_act(fc2, F.gelu(fc1.reference_forward(x2), approximate="tanh"))
        steps = (codes.int() - ref_codes.int()).abs()
        off = float((steps != 0).float().mean()) if int(steps.max()) <= 1 else math.inf
        got = gelu_mlp(x, fc1, fc2, res, gate, gres)
        ref = gated_sum(_reference_gemm(fc2, codes, scales, low, dtype, res).reshape(got.shape), gate, gres)
        return [("fc2 codes one step off (fraction)", off, CODE_STEPS),
                ("fc2 scales", _error(scales, ref_scales), TOLERANCE[dtype]),
                ("fc2 low-rank input", _error(low, ref_low), LOW_TOLERANCE),
                ("output", _error(got, ref), TOLERANCE[dtype])]

    return Check(dispatch.gelu_mlp_config(fc1, fc2, dtype, residual, gated), run, fallback, modules=(fc1, fc2))


def _awq(layer: nn.Module, dtype: torch.dtype) -> Check:
    """The AWQ GEMV (one row per image) against the layer's dequantized reference."""
    def run(device, dtype):
        if not dispatch.awq_kernel(device, IMAGES):
            raise _Skip("AWQ layers run the PyTorch reference on this device")
        x = _inputs(torch.Generator().manual_seed(SEED), (IMAGES, layer.in_features), device, dtype)
        return [("output", _error(layer(x), layer.reference_forward(x)), TOLERANCE[dtype])]

    return Check(dispatch.awq_config(layer, dtype), run, modules=(layer,))


def _rotate_pairs(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE with complex frequencies (S, D/2), one per pair of channels, as diffusers applies it (use_real=False):
    x (B, S, H, D) as complex pairs times the frequencies, in fp32, rounded back to x's dtype."""
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs.unsqueeze(1)
    return torch.view_as_real(rotated).flatten(3).type_as(x)


def _rope(streams: list[tuple[nn.Module, nn.Module]], heads: int, head_dim: int, spec: tuple[float, bool],
          paired: bool, dtype: torch.dtype, fallback: tuple) -> Check:
    """svdq::qk_norm_rope on the attention's (q norm, k norm) per stream, against its norms, diffusers' RoPE
    (real tables over the joint sequence, or complex tables per stream: `paired`) and the concatenation."""
    from diffusers.models.embeddings import apply_rotary_emb

    from pipeline.kernels import ops

    eps, round_normed = spec

    def run(device, dtype):
        if not dispatch.plain_kernels(device):
            raise _Skip("the q/k norm + RoPE kernel does not run on this device")
        tokens = list(_tokens(device)) if len(streams) == 2 else [sum(_tokens(device))]
        g = torch.Generator().manual_seed(SEED)
        qs, ks = [], []
        for s in tokens:  # q, k as views of a fused projection's output; token 0 with a mean square near eps
            x = torch.randn(IMAGES, s, 3 * heads * head_dim, generator=g) * 3
            x[:, 0] *= 3e-4
            q, k, _ = x.to(device, dtype).chunk(3, dim=-1)
            qs.append(q.unflatten(-1, (heads, head_dim)))
            ks.append(k.unflatten(-1, (heads, head_dim)))
        angles = [torch.rand(s, head_dim // 2, generator=g) * 2 * math.pi for s in tokens]
        if paired:
            freqs = [torch.polar(torch.ones_like(a), a).to(device) for a in angles]
            tables = [torch.view_as_real(f) for f in freqs]
            cos, sin = [t[..., 0] for t in tables], [t[..., 1] for t in tables]
        else:
            joint = torch.cat(angles).repeat_interleave(2, dim=-1).to(device)
            cos, sin = [joint.cos()], [joint.sin()]
        wq, wk = [qn.weight for qn, _ in streams], [kn.weight for _, kn in streams]
        got = ops.qk_norm_rope(qs, ks, wq, wk, cos, sin, eps, round_normed, paired)
        errors = []
        for i, xs in enumerate((qs, ks)):
            normed = [pair[i](x) for pair, x in zip(streams, xs)]
            if paired:
                ref = torch.cat([_rotate_pairs(n, f) for n, f in zip(normed, freqs)], dim=1)
            else:
                ref = apply_rotary_emb(torch.cat(normed, dim=1), (cos[0], sin[0]), sequence_dim=1)
            errors.append(("qk"[i], _error(got[i], ref), TOLERANCE[dtype]))
        return errors

    weighted = streams[0][0].weight is not None
    return Check(dispatch.rope_config(round_normed, paired, weighted, dtype), run, fallback,
                 modules=tuple(norm for pair in streams for norm in pair))


def _adaln(norm: nn.Module, dtype: torch.dtype) -> Check:
    """fused_norm.modulate (the kernel) against diffusers' norm(x)·(1 + scale) + shift; scale and shift are chunks
    of one modulation output, as the blocks pass them."""
    from pipeline.quantization.fused_norm import modulate

    def run(device, dtype):
        if not dispatch.plain_kernels(device):
            raise _Skip("the AdaLN kernel does not run on this device")
        g = torch.Generator().manual_seed(SEED)
        n = norm.normalized_shape[0]
        x = _inputs(g, (IMAGES, _tokens(device)[1], n), device, dtype)
        scale, shift = _inputs(g, (IMAGES, 2 * n), device, dtype).chunk(2, dim=1)
        ref = norm(x) * (1 + scale[:, None]) + shift[:, None]
        return [("output", _error(modulate(norm, x, scale, shift), ref), TOLERANCE[dtype])]

    return Check(dispatch.adaln_config(dtype), run, modules=(norm,))


# ---------- which configurations a model calls ----------

class PlanContext:
    """What a family's fused module uses to list its kernel calls (its `kernel_checks`): the checks of its layers'
    calls, as this walk plans them, and the fused kernels' checks."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.claimed: set[int] = set()  # layers whose calls were planned by their owner

    def linear(self, layer, residual=False, gated=False) -> Check:
        self.claimed.add(id(layer))
        return _linear(layer, self.dtype, residual, gated)

    @staticmethod
    def svdq(owner, *names) -> list[nn.Module]:
        from pipeline.quantization.layers import SVDQW4A4Linear

        found = [getattr(owner, n, None) for n in names]
        return [m for m in found if isinstance(m, SVDQW4A4Linear)]

    def joint_or_plain(self, layers) -> list[Check]:
        """joint_linear's call where it applies (the text stream first), else each layer's own."""
        from pipeline.quantization.layers import is_int4_w4a4

        plain = tuple(self.linear(m) for m in layers)
        if len(layers) == 2 and all(is_int4_w4a4(m) for m in layers) and len({m.out_features for m in layers}) == 1:
            return [_joint(tuple(layers), self.dtype, plain)]
        return list(plain)

    def outputs(self, attn) -> list[nn.Module]:
        """The attention's output projections that are SVDQuant layers (to_add_out, to_out[0])."""
        from pipeline.quantization.layers import SVDQW4A4Linear

        to_out = getattr(attn, "to_out", None)
        return self.svdq(attn, "to_add_out") + (
            [to_out[0]] if to_out is not None and isinstance(to_out[0], SVDQW4A4Linear) else [])

    def rope(self, streams, heads: int, head_dim: int, spec, paired: bool, fallback: tuple) -> Check:
        return _rope(streams, heads, head_dim, spec, paired, self.dtype, fallback)

    def gelu_mlp(self, fc1, fc2, residual: bool, gated: bool, fallback: tuple) -> Check:
        return _gelu_mlp(fc1, fc2, self.dtype, residual, gated, fallback)

    @staticmethod
    def norm_args(norms, dtype, head_dim):
        from pipeline.quantization.fused_attention import norm_args

        return norm_args(norms, dtype, head_dim)


def plan(model: nn.Module, dtype: torch.dtype) -> list[Check]:
    """The checks of every kernel configuration `model`'s forward calls with activations in dtype, one per
    configuration, found by walking its modules as their forwards call them (layers.py, fused_*.py, and each
    family's fused modules: a processor or module with `kernel_checks` lists its own calls, a block with
    `kernel_norms` the norms it runs through the AdaLN kernel, `gates_in_epilogue` a block whose branches end in
    gated GEMMs)."""
    from pipeline.quantization.fused_mlp import FusedGeluFeedForward
    from pipeline.quantization.fused_norm import FusedAdaLayerNormZero, FusedAdaLayerNormZeroSingle
    from pipeline.quantization.layers import AWQW4A16Linear, SplitInputLinear, SVDQW4A4Linear

    ctx = PlanContext(dtype)
    checks: list[Check] = []

    def adaln(norm) -> None:
        if type(norm) is nn.LayerNorm and not norm.elementwise_affine:
            checks.append(_adaln(norm, dtype))

    modules = dict(model.named_modules())
    for name, module in modules.items():
        parent = modules.get(name.rpartition(".")[0]) if name else None
        processor = getattr(module, "processor", None)
        if hasattr(processor, "kernel_checks"):
            checks += processor.kernel_checks(module, parent, ctx)
        elif isinstance(module, FusedGeluFeedForward):
            fc1, fc2 = module.net[0].proj, module.net[2]
            gated = getattr(parent, "gates_in_epilogue", False)
            checks.append(ctx.gelu_mlp(fc1, fc2, False, gated, (ctx.linear(fc1), ctx.linear(fc2, gated=gated))))
        elif hasattr(module, "kernel_checks"):
            checks += module.kernel_checks(parent, ctx)
        elif isinstance(module, SplitInputLinear):
            if isinstance(module.second, SVDQW4A4Linear) and id(module.second) not in ctx.claimed:
                checks.append(ctx.linear(module.second, residual=True))
        elif isinstance(module, AWQW4A16Linear):
            checks.append(_awq(module, dtype))
        elif isinstance(module, (FusedAdaLayerNormZero, FusedAdaLayerNormZeroSingle)):
            adaln(module.norm)
        for norm in (module.kernel_norms() if hasattr(module, "kernel_norms") else ()):
            adaln(norm)
    checks += [ctx.linear(m) for m in modules.values() if isinstance(m, SVDQW4A4Linear) and id(m) not in ctx.claimed]
    unique: dict[tuple, Check] = {}
    for check in checks:
        unique.setdefault(check.config, check)
    return list(unique.values())


# ---------- the check ----------

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _on(device: torch.device, modules: tuple[nn.Module, ...]):
    """The check's modules on `device` for its duration, then back where they were: a model that waits in host
    memory (offloaded, or placed only after its check) lends just the layers a check calls."""
    homes = []
    for m in modules:
        held = next(itertools.chain(m.parameters(), m.buffers()), None)
        homes.append(held.device if held is not None else None)
        if held is not None and held.device != device:
            m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes):
            if home is not None and home != device:
                m.to(home)


def _run(check: Check, device: torch.device, dtype: torch.dtype) -> dict:
    """The configuration's entry: its parts compared, or the exception that stopped its kernel."""
    entry = {"name": config_name(check.config), "status": "passed", "max_error": None, "tolerance": None}
    start = time.perf_counter()
    try:
        with torch.no_grad(), _on(device, check.modules):
            parts = check.run(device, dtype)
        _synchronize(device)
    except _Skip as skip:
        return dict(entry, status="skipped", reason=str(skip), seconds=round(time.perf_counter() - start, 4))
    except Exception as e:  # a kernel that does not compile or launch here fails its configuration
        first_line = (str(e).strip().splitlines() or [""])[0]
        return dict(entry, status="failed", reason=f"{type(e).__name__}: {first_line}"[:300],
                    seconds=round(time.perf_counter() - start, 4))
    ratio = {label: (err / tol if err == err else math.inf) for label, err, tol in parts}
    label, err, tol = max(parts, key=lambda p: ratio[p[0]])
    entry.update(max_error=err if math.isfinite(err) else None, tolerance=tol,
                 detail="; ".join(f"{lab} {e:.3g} (tolerance {t:.3g})" for lab, e, t in parts),
                 seconds=round(time.perf_counter() - start, 4))
    if not all(e <= t for _, e, t in parts):  # NaN fails
        entry.update(status="failed", reason=f"{label}: error {err:.3g} > tolerance {tol:.3g}")
    return entry


def _summary(dev: str, dtype: torch.dtype, entries: list[dict], seconds: float) -> str:
    counts = {s: sum(e["status"] == s for e in entries) for s in ("passed", "failed", "skipped")}
    failed = "".join(f"; {e['name']} failed ({e['reason']}): it runs {e['runs_instead']}"
                     for e in entries if e["status"] == "failed")
    return (f"kernel self-check on {dev} ({str(dtype).rpartition('.')[2]}): {len(entries)} configurations, "
            f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped in {seconds:.2f} s"
            f"{failed}")


def self_check(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, strict: bool) -> dict:
    """Check each kernel configuration `model` (an installed quantized transformer on `device`, activations in
    `dtype`) will use and that this process has not checked on this device yet; a failed one runs the reference
    from now on (a warning each), or with `strict` raises KernelCheckError. Returns the record for run.json."""
    device = torch.device(device)
    start = time.perf_counter()
    record = {"device": str(device), "dtype": str(dtype).rpartition(".")[2], "strict": strict}
    why = dispatch.why_reference(device)
    if why is not None:
        return dict(record, status="skipped", reason=why, configurations=[],
                    summary=f"kernel self-check skipped: {why}")
    dev = dispatch.device_key(device)
    record["device"] = dev
    held = next(itertools.chain(model.parameters(), model.buffers()), None)
    if held is not None and held.device.type not in ("cpu", device.type):
        raise ValueError(f"the model is on {held.device}: keep it in host memory or on {dev} for its self-check")
    queue, seen, entries = plan(model, dtype), set(), []
    while queue:
        check = queue.pop(0)
        if check.config in seen:
            continue
        seen.add(check.config)
        cached = _RESULTS.get((dev, check.config))
        if cached is not None:
            entry = dict(cached, cached=True)
        else:
            entry = dict(_run(check, device, dtype), cached=False)
            if entry["status"] == "failed":
                dispatch.disable(device, check.config)
                entry["runs_instead"] = "its unfused calls" if check.fallback else "the PyTorch reference"
                if not strict:  # strict raises instead
                    log.warning("kernel self-check: %s disagrees with the PyTorch reference on %s (%s); it runs %s "
                                "from now on", entry["name"], dev, entry["reason"], entry["runs_instead"])
            if entry["status"] != "skipped":  # a skip costs nothing: asked again next time
                _RESULTS[(dev, check.config)] = dict(entry)
        entries.append(entry)
        if entry["status"] == "failed":
            queue.extend(check.fallback)  # the unfused calls now made instead
    seconds = time.perf_counter() - start
    failed = [e for e in entries if e["status"] == "failed"]
    status = "failed" if failed else "passed" if any(e["status"] == "passed" for e in entries) else "skipped"
    record.update(status=status, configurations=entries, seconds=round(seconds, 3),
                  summary=_summary(dev, dtype, entries, seconds))
    if strict and failed:
        names = "; ".join(f"{e['name']}: {e['reason']}" for e in failed)
        raise KernelCheckError(
            f"Triton kernel configuration(s) disagree with the PyTorch reference on {dev}: {names}. Rerun without "
            f"quantization.strict=true to run the PyTorch reference for just these (a warning names each), or set "
            f"SVDQ_KERNELS=reference to run it everywhere.", record)
    return record


def forget(config: Optional[tuple] = None) -> None:
    """Forget a configuration's results on every device (None: all) and run its kernels again, as a fresh process
    would (tests)."""
    for key in [k for k in _RESULTS if config is None or k[1] == config]:
        del _RESULTS[key]
    dispatch.enable(config)
