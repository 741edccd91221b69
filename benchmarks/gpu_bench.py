"""GPU benchmark: our W4A4 GEMM vs cuBLAS BF16 and FP8, and whole transformers vs BF16 and NF4.

    python benchmarks/gpu_bench.py                    # everything (make bench-gpu); needs CUDA
    python benchmarks/gpu_bench.py --only gemm        # piecewise: gemm | flux | qwen
    python benchmarks/gpu_bench.py --smoke            # toy sizes on CPU: checks the script, timings meaningless
    python benchmarks/gpu_bench.py --report a.json b.json --out docs/benchmarks.json --markdown docs/benchmarks.md
                                                      # merge piecewise runs; targets recomputed over all rows

Prints tables and writes JSON (default outputs/bench/gpu.json). Transformers are built from their
configs with random weights (no download); quantized layers get random 4-bit codes and scales:
speed and memory do not depend on the values. Targets (issue #4, ratios in the same run): GEMM >=
1.3x cuBLAS BF16 at the large shapes; forward <= 0.75x BF16 eager and <= 0.55x NF4; weights <= 1/3.5
of BF16. Each target line says whether it was met and by how much. `--profile` adds the top CUDA
kernels of one INT4 forward (what limits it). On a lent GPU machine, benchmarks/device_run.sh runs
the GPU tests and these parts, one call each.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

GEMM_SHAPES = [(4608, 3072, 3072), (4608, 3072, 12288), (4608, 12288, 3072), (4096, 15360, 3072)]
SMOKE_GEMM_SHAPES = [(48, 256, 128), (48, 128, 256)]
FLUX_DEV = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
                in_channels=64, patch_size=1)
QWEN_IMAGE = dict(num_layers=60, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                  in_channels=64, out_channels=16, patch_size=2, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
SMOKE_FLUX = dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
                  joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 28, 28))
SMOKE_QWEN = dict(QWEN_IMAGE, num_layers=1, attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64,
                  axes_dims_rope=(8, 28, 28))


def timed(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() over iters runs (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def kernel_ms(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Median milliseconds of one call as the GPU runs it, for the GEMM-level rows. On CUDA this is Triton's
    do_bench: the L2 cache is cleared before every call (weights arrive cold, as in a transformer) and that
    clearing is queued before the start event, so the Python launch (larger for a Triton kernel than for
    cuBLAS) happens while the GPU is busy and stays off the clock. Per-call events after a synchronize
    (`timed`) would charge each kernel its launch latency. Elsewhere (the CPU smoke run) it is `timed`."""
    if device.type != "cuda":
        return timed(fn, device, iters)
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def random_svdq(n: int, k: int, rank: int, unsigned: bool, device, dtype):
    from pipeline.quantization.layers import SVDQW4A4Linear
    from pipeline.quantization.numerics import GELU_SHIFT

    g = torch.Generator(device=device).manual_seed(n * 7 + k)
    return SVDQW4A4Linear(
        precision="int4",
        qweight=torch.randint(-8, 8, (n, k), generator=g, device=device, dtype=torch.int8),
        wscales=(torch.rand(n, k // 64, generator=g, device=device) * 0.01 + 1e-3).to(dtype),
        smooth=(torch.rand(k, generator=g, device=device) + 0.5).to(dtype),
        proj_down=(torch.randn(k, rank, generator=g, device=device) * 0.02).to(dtype),
        proj_up=(torch.randn(n, rank, generator=g, device=device) * 0.02).to(dtype),
        bias=torch.zeros(n, device=device, dtype=dtype), act_unsigned=unsigned,
        act_shift=GELU_SHIFT if unsigned else 0.0)


# ---------- GEMM ----------

def bench_gemm(device, dtype, shapes, iters, rows: list[dict] | None = None,
               on_row: Callable[[], None] = lambda: None) -> list[dict]:
    """One row per shape, appended to `rows` as measured (on_row() after each, as bench_transformer)."""
    from pipeline.kernels.dispatch import kernel_mode

    rows = [] if rows is None else rows
    for m, k, n in shapes:
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
        flop = 2 * m * n * k
        row = {"M": m, "K": k, "N": n}
        row["bf16_ms"] = kernel_ms(lambda: x @ w.T, device, iters)
        if device.type == "cuda" and hasattr(torch, "_scaled_mm"):
            xf, wf = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
            one = torch.ones((), device=device)
            row["fp8_ms"] = kernel_ms(lambda: torch._scaled_mm(xf, wf.t(), scale_a=one, scale_b=one, out_dtype=dtype),
                                      device, iters)
        layer = random_svdq(n, k, 32, False, device, dtype)
        mode = kernel_mode(device, "int4")
        row["kernel"] = mode
        if mode != "reference":
            from pipeline.kernels.triton_w4a4 import (act_code_format, device_arch, expand_weight_codes,
                                                      expand_weights_default, quantize_act, scale_mma_default,
                                                      w4a4_gemm)

            fmt = act_code_format(mode)  # as the layer runs it (ops.w4a4_linear)
            codes, scales, low = quantize_act(x, layer.smooth, layer.proj_down, 0.0, False, codes=fmt)
            row["w4a4_gemm_ms"] = kernel_ms(lambda: w4a4_gemm(codes, scales, layer.packed_codes, layer.wscales, low,
                                                              layer.proj_up, layer.bias, dtype, mode), device, iters)
            row["act_quant_ms"] = kernel_ms(
                lambda: quantize_act(x, layer.smooth, layer.proj_down, 0.0, False, codes=fmt), device, iters)
            # the other way of forming s_a ⊗ s_w (tensor cores vs FP32), so a run shows which default pays
            arch = device_arch(device)
            row["scale_mma"] = scale_mma_default(mode, arch, scales.dtype, layer.wscales.dtype)
            row["w4a4_gemm_other_scale_ms"] = kernel_ms(
                lambda: w4a4_gemm(codes, scales, layer.packed_codes, layer.wscales, low, layer.proj_up, layer.bias,
                                  dtype, mode, scale_mma=not row["scale_mma"]), device, iters)
            # and weight codes packed vs expanded one per byte first (the expansion is inside the timings)
            row["expand_weights"] = expand_weights_default(mode, arch)
            row["w4a4_gemm_other_expand_ms"] = kernel_ms(
                lambda: w4a4_gemm(codes, scales, layer.packed_codes, layer.wscales, low, layer.proj_up, layer.bias,
                                  dtype, mode, expand_weights=not row["expand_weights"]), device, iters)
            if mode in ("fp8", "int8"):
                row["expand_ms"] = kernel_ms(lambda: expand_weight_codes(layer.packed_codes, mode), device, iters)
            if mode in ("fp8", "int8") and n > k:  # an MLP's first layer: into the next layer's codes
                row.update(bench_mlp_first_layer(layer, codes, scales, low, random_svdq(k, n, 32, True, device, dtype),
                                                 dtype, mode, device, iters))
        row["layer_ms"] = kernel_ms(lambda: layer(x), device, iters)
        for key in ("bf16", "fp8", "w4a4_gemm", "layer"):
            if f"{key}_ms" in row:
                row[f"{key}_tflops"] = flop / (row[f"{key}_ms"] * 1e-3) / 1e12
        if "w4a4_gemm_ms" in row:
            row["gemm_vs_bf16"] = row["bf16_ms"] / row["w4a4_gemm_ms"]
            row["layer_vs_bf16"] = row["bf16_ms"] / row["layer_ms"]
        rows.append(row)
        on_row()
        del x, w, layer
        _free(device)
    return rows


def bench_mlp_first_layer(fc1, codes, scales, low, fc2, dtype, mode: str, device, iters: int) -> dict:
    """fc1's quantized input -> fc2's quantized input, both ways: fc1's GEMM, torch's GELU and fc2's activation
    kernel (unfused), or the one GEMM with the GELU-quantize epilogue (fused_mlp.py)."""
    from pipeline.kernels.triton_w4a4 import quantize_act, w4a4_gemm, w4a4_gemm_gelu_quant

    fc1_args = (codes, scales, fc1.packed_codes, fc1.wscales, low, fc1.proj_up, fc1.bias, dtype, mode, False)

    def unfused():
        h = torch.nn.functional.gelu(w4a4_gemm(*fc1_args), approximate="tanh")
        return quantize_act(h, fc2.smooth, fc2.proj_down, fc2.act_shift, True, codes=mode)

    def fused():
        return w4a4_gemm_gelu_quant(*fc1_args, fc2.smooth, fc2.proj_down, fc2.act_shift, True)

    return {"mlp_unfused_ms": kernel_ms(unfused, device, iters), "mlp_fused_ms": kernel_ms(fused, device, iters)}


# ---------- whole transformers ----------

def build_transformer(family: str, config: dict, device, dtype):
    """Random-weight transformer on the device. The repeated blocks (nearly all the weights) are made on
    the meta device and filled in place; the rest is built normally, since the rotary embeddings keep
    non-persistent buffers that meta init would lose."""
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    cls = FluxTransformer2DModel if family == "flux" else QwenImageTransformer2DModel
    small = dict(config, num_layers=1, **({"num_single_layers": 1} if family == "flux" else {}))
    with torch.device(device):
        model = cls(**small).to(dtype)
    with torch.device("meta"):
        full = cls(**config)
    for name in ("transformer_blocks", "single_transformer_blocks"):
        if hasattr(full, name):
            blocks = getattr(full, name).to_empty(device=device).to(dtype)
            with torch.no_grad():
                for p in blocks.parameters():
                    p.normal_(0.0, 0.02)
            setattr(model, name, blocks)
    return model.eval()


def transformer_inputs(family: str, config: dict, tokens: int, text_tokens: int, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    hid = torch.randn(1, tokens, config["in_channels"], generator=g, device=device, dtype=dtype)
    txt = torch.randn(1, text_tokens, config["joint_attention_dim"], generator=g, device=device, dtype=dtype)
    t = torch.tensor([0.5], device=device, dtype=dtype)
    side = int(tokens**0.5)
    if family == "flux":
        ids = torch.zeros(tokens, 3, device=device)
        ids[:, 1] = torch.arange(tokens, device=device) // side
        ids[:, 2] = torch.arange(tokens, device=device) % side
        kw = dict(hidden_states=hid, encoder_hidden_states=txt, timestep=t, img_ids=ids,
                  txt_ids=torch.zeros(text_tokens, 3, device=device),
                  pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g, device=device, dtype=dtype))
        if config.get("guidance_embeds"):
            kw["guidance"] = torch.tensor([3.5], device=device, dtype=dtype)
        return kw
    return dict(hidden_states=hid, encoder_hidden_states=txt, timestep=t,
                encoder_hidden_states_mask=torch.ones(1, text_tokens, device=device, dtype=dtype),
                img_shapes=[(1, side, side)])


def random_awq(n: int, k: int, device, dtype):
    from pipeline.quantization.layers import AWQW4A16Linear

    g = torch.Generator(device=device).manual_seed(n * 3 + k)
    return AWQW4A16Linear(qweight=torch.randint(0, 16, (n, k), generator=g, device=device, dtype=torch.uint8),
                          wscales=(torch.rand(n, k // 64, generator=g, device=device) * 1e-3).to(dtype),
                          wzeros=(torch.rand(n, k // 64, generator=g, device=device) * -7e-3).to(dtype),
                          bias=torch.zeros(n, device=device))


def install_targets_(model, svdq: Callable[[int, int, bool], torch.nn.Module],
                     awq: Callable[[int, int], torch.nn.Module]) -> int:
    """Every quantization target installed as the quantizer would leave it: svdq(N, K, after_gelu) for the W4A4
    layers, awq(N, K) for the modulation; how many targets."""
    from pipeline.quantization.targets import targets_for
    from pipeline.quantization.transform import get_module, install

    pending: dict = {}
    targets = targets_for(model)
    for t in targets:
        mods = [get_module(model, p) for p in t.parts]
        n = sum(m.out_features for m in mods)
        k = (t.cols[1] - t.cols[0]) if t.cols else mods[0].in_features
        install(model, t, awq(n, k) if t.kind == "awq" else svdq(n, k, t.after_gelu), pending)
    return len(targets)


def quantize_random_(model, rank: int, device, dtype) -> int:
    """Every target as the quantizer would leave it (W4A4 layers, AWQ modulation), with random values."""
    return install_targets_(model, lambda n, k, unsigned: random_svdq(n, k, rank, unsigned, device, dtype),
                            lambda n, k: random_awq(n, k, device, dtype))


def nf4_(model, dtype) -> int:
    import bitsandbytes as bnb

    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and "blocks" in f"{name}.{child_name}":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, q.to(child.weight.device))
                count += 1
    return count


def weight_bytes(model) -> int:
    """Parameters and buffers as held in memory, plus NF4's quantization state (absmax), which is neither."""
    from pipeline.quantization.apply import module_bytes

    total = module_bytes(model)
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        while state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            state = getattr(state, "state2", None)
    return total


def profile_forward(model, kw, device, top: int = 25) -> list[dict]:
    """The kernels one forward spends its GPU time in, largest first (CPU: operators)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), profile(activities=acts) as prof:
        model(**kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
    cuda = device.type == "cuda"
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"  # self times: nothing counted twice
    events = [e for e in prof.key_averages()
              if not cuda or e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1.0
    rows = []
    for e in events[:top]:
        us = getattr(e, attr)
        rows.append({"name": e.key[:90], "calls": e.count, "ms": us / 1e3, "share": us / total})
    return rows


FUSIONS = ("mlp", "rope", "norm", "gate")  # pipeline.quantization: fused_mlp, fused_attention, fused_norm, fused_block
ABLATIONS = {"unfused": set(FUSIONS), **{f"unfused-{f}": {f} for f in FUSIONS}}


def int4_variant(variant: str) -> tuple[int, set[str]]:
    """int4_r<rank>[_unfused | _unfused-<fusion>] -> (rank, the fusions turned off)."""
    rank, _, ablation = variant.removeprefix("int4_r").partition("_")
    if not rank.isdigit() or (ablation and ablation not in ABLATIONS):
        raise SystemExit(f"unknown variant {variant!r}: int4_r<rank>, optionally _{' | _'.join(ABLATIONS)}")
    return int(rank), ABLATIONS.get(ablation, set())


def is_ablation(variant: str) -> bool:
    """int4_r<rank>_<ablation>: fusions turned off, to measure what they save (a table row, not a target)."""
    return variant.startswith("int4_r") and bool(int4_variant(variant)[1])


@contextlib.contextmanager
def fusions_off(names: set[str]):
    """Quantize with these fusions left out (each module's ENABLED, read when layers are installed)."""
    from pipeline.quantization import fused_attention, fused_block, fused_mlp, fused_norm

    modules = {"mlp": fused_mlp, "rope": fused_attention, "norm": fused_norm, "gate": fused_block}
    saved = {name: m.ENABLED for name, m in modules.items()}
    for name, m in modules.items():
        m.ENABLED = saved[name] and name not in names
    try:
        yield
    finally:
        for name, m in modules.items():
            m.ENABLED = saved[name]


def bench_transformer(family: str, config: dict, device, dtype, tokens: int, text_tokens: int, iters: int,
                      compile_: set[str], variants: list[str], profile: bool = False,
                      rows: list[dict] | None = None, on_row: Callable[[], None] = lambda: None) -> list[dict]:
    """One row per (variant, mode), appended to `rows` as it is measured (on_row() after each, so a run cut
    off by a time limit keeps what it had). Every variant's eager forward comes before any torch.compile
    (minutes per full model), so the rows the targets need most are measured first; ablations come last."""
    rows = [] if rows is None else rows

    def stages(vs: list[str]) -> list[tuple[str, str]]:
        return [(v, "eager") for v in vs] + [(v, "compiled") for v in vs if v in compile_]

    ablations = [v for v in variants if is_ablation(v)]  # last: the targets need the others
    plan = stages([v for v in variants if v not in ablations]) + stages(ablations)
    profiled: set[str] = set()
    for number, (variant, mode) in enumerate(plan, 1):
        if any(r.get("model") == family and r["variant"] == variant and "skipped" in r for r in rows):
            continue
        # before the work (a full model's build or compile takes minutes); the `measured` line follows it
        print(f"[{number}/{len(plan)}] {family} {variant} {mode}: building and timing", file=sys.stderr, flush=True)
        _free(device)
        model = build_transformer(family, config, device, dtype)
        if variant == "nf4":
            try:
                nf4_(model, dtype)
            except ImportError as e:
                rows.append({"model": family, "variant": variant, "skipped": f"bitsandbytes not importable: {e}"})
                on_row()
                continue
        elif variant.startswith("int4_r"):
            rank, off = int4_variant(variant)
            with fusions_off(off):
                quantize_random_(model, rank, device, dtype)
        _free(device)
        kw = transformer_inputs(family, config, tokens, text_tokens, device, dtype)
        fn = torch.compile(model) if mode == "compiled" else model
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()  # weights + one forward's activations, not the build
        with torch.inference_mode():
            ms = timed(lambda: fn(**kw), device, iters, warmup=2)
        row = {"model": family, "variant": variant, "mode": mode, "ms_per_forward": ms,
               "weight_bytes": weight_bytes(model)}
        if device.type == "cuda":
            row["peak_bytes"] = torch.cuda.max_memory_allocated()
        rows.append(row)
        on_row()
        kind = "bf16" if variant == "bf16" else "int4" if variant.startswith("int4") else None
        if profile and mode == "eager" and kind and kind not in profiled:  # BF16 and the first INT4 variant
            profiled.add(kind)
            row["profile"] = profile_forward(model, kw, device)
            on_row()
        del model, fn, kw
        _free(device)
    return rows


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------- report ----------

def targets(gemm: list[dict], forwards: list[dict]) -> list[dict]:
    out = []
    large = [r for r in gemm if min(r["K"], r["N"]) >= 3072 and max(r["K"], r["N"]) >= 12288 and "gemm_vs_bf16" in r]
    if large:
        worst = min(r["gemm_vs_bf16"] for r in large)
        out.append({"target": "W4A4 GEMM >= 1.3x cuBLAS BF16 (large shapes, worst)", "value": worst, "goal": 1.3,
                    "met": worst >= 1.3})
    by: dict = {}
    for r in forwards:  # merged parts may measure a variant twice (an ablation part's own int4_r32): the first counts
        if "ms_per_forward" in r:
            by.setdefault((r["model"], r["variant"], r["mode"]), r)
    for model in sorted({k[0] for k in by}):
        bf16 = by.get((model, "bf16", "eager"))
        nf4 = by.get((model, "nf4", "eager"))
        for (m, variant, mode), r in sorted(by.items()):
            if m != model or not variant.startswith("int4") or is_ablation(variant):
                continue  # an ablation is shown in the table, not a target
            if bf16:
                v = r["ms_per_forward"] / bf16["ms_per_forward"]
                out.append({"target": f"{model} {variant} {mode} forward <= 0.75x BF16 eager", "value": v,
                            "goal": 0.75, "met": v <= 0.75})
                w = r["weight_bytes"] / bf16["weight_bytes"]
                out.append({"target": f"{model} {variant} weights <= 1/3.5 of BF16", "value": w,
                            "goal": 1 / 3.5, "met": w <= 1 / 3.5})
            if nf4:
                v = r["ms_per_forward"] / nf4["ms_per_forward"]
                out.append({"target": f"{model} {variant} {mode} forward <= 0.55x NF4 eager", "value": v,
                            "goal": 0.55, "met": v <= 0.55})
    return out


TIMING = ("GEMM, layer and MLP rows: triton.testing.do_bench median, L2 cleared before each call; "
          "forwards: CUDA events around each forward, median")
GEMM_COLUMNS = ("M×K×N", "cuBLAS BF16", "cuBLAS FP8", "ours W4A4 GEMM", "ours layer (act quant + GEMM)",
                "GEMM / BF16", "kernel")
GEMM_SHORT = ("M×K×N", "bf16", "fp8", "ours gemm", "ours layer", "gemm/bf16", "kernel")  # terminal widths
FORWARD_COLUMNS = ("model", "variant", "mode", "ms", "weights GiB", "peak GiB")


def _gemm_cells(r: dict) -> list[str]:
    tflops = [f"{r[k]:.1f}" if k in r else "-" for k in ("bf16_tflops", "fp8_tflops", "w4a4_gemm_tflops", "layer_tflops")]
    ratio = f"{r['gemm_vs_bf16']:.2f}×" if "gemm_vs_bf16" in r else "-"
    return [f"{r['M']}×{r['K']}×{r['N']}", *tflops, ratio, r["kernel"]]


def _variant_cells(r: dict) -> list[str]:
    default = f"{'MMA' if r.get('scale_mma') else 'FP32'}, {'bytes' if r.get('expand_weights') else 'packed'}"
    ms = [f"{r[k]:.3f}" if k in r else "-" for k in ("w4a4_gemm_ms", "w4a4_gemm_other_scale_ms",
                                                      "w4a4_gemm_other_expand_ms", "expand_ms")]
    return [f"{r['M']}×{r['K']}×{r['N']}", default, *ms]


def _mlp_cells(r: dict) -> list[str]:
    return [f"{r['M']}×{r['K']}×{r['N']}", f"{r['mlp_unfused_ms']:.3f}", f"{r['mlp_fused_ms']:.3f}",
            f"{r['mlp_fused_ms'] / r['mlp_unfused_ms']:.2f}"]


def _forward_cells(r: dict) -> list[str]:
    if "skipped" in r:
        return [r.get("model", ""), r["variant"], "skipped", r["skipped"], "", ""]
    peak = f"{r['peak_bytes'] / 2**30:.2f}" if "peak_bytes" in r else "-"
    return [r["model"], r["variant"], r["mode"], f"{r['ms_per_forward']:.1f}", f"{r['weight_bytes'] / 2**30:.2f}", peak]


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if result["gemm"]:
        t = Table(title=f"GEMM TFLOP/s on {result['device']}")
        for c in GEMM_SHORT:
            t.add_column(c, justify="left" if c in LEFT else "right")
        for r in result["gemm"]:
            t.add_row(*_gemm_cells(r))
        console.print(t)
    mlps = [r for r in result["gemm"] if "mlp_fused_ms" in r]
    if mlps:
        t = Table(title="MLP first layer into the next layer's codes (ms)")
        for c in ("M×K×N", "unfused", "fused", "fused/unfused"):
            t.add_column(c, justify="left" if c in LEFT else "right")
        for r in mlps:
            t.add_row(*_mlp_cells(r))
        console.print(t)
    if result["transformers"]:
        t = Table(title="Transformer forward (batch 1)")
        for c in FORWARD_COLUMNS:
            t.add_column(c, justify="left" if c in LEFT else "right")
        for r in result["transformers"]:
            t.add_row(*_forward_cells(r))
        console.print(t)
    for tg in result["targets"]:
        console.print(f"target: {tg['target']}: {tg['value']:.3f} (goal {tg['goal']:.3f}) {_verdict(tg)}")


LEFT = {"M×K×N", "model", "variant", "mode", "kernel", "target", "verdict"}


def _md_table(columns, rows) -> list[str]:
    rule = "|" + "|".join("---" if c in LEFT else "---:" for c in columns) + "|"
    return ["| " + " | ".join(columns) + " |", rule] + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def markdown(result: dict) -> str:
    """The same tables as print_tables, as Markdown (docs/benchmarks.md)."""
    lines = [f"# GPU benchmark: {result['device']}", "",
             f"torch {result['torch']}, {result['dtype']}; written by `benchmarks/gpu_bench.py` "
             f"(JSON beside this file). Ratios are measured in the same run.", ""]
    if result.get("timing"):
        lines += [f"Timing: {result['timing']}.", ""]
    if not result.get("complete", True):
        cut = ", ".join(result.get("incomplete") or ["this run"])
        lines += [f"**Incomplete:** {cut} stopped before measuring everything it was asked to; "
                  "the rows below are those it measured.", ""]
    if result["gemm"]:
        lines += ["## GEMM (TFLOP/s)", ""] + _md_table(GEMM_COLUMNS, map(_gemm_cells, result["gemm"]))
    variants = [r for r in result["gemm"] if "w4a4_gemm_other_expand_ms" in r]
    if variants:
        lines += ["## W4A4 GEMM variants (ms; the default first)", "",
                  "s_a ⊗ s_w on tensor cores (MMA) or FP32 multiplies; weight codes expanded to one per byte "
                  "before the GEMM (bytes, the expansion included) or converted in its K loop (packed).", ""]
        lines += _md_table(("M×K×N", "default", "ms", "other s_a ⊗ s_w", "other weights", "expansion alone"),
                           (_variant_cells(r) for r in variants))
    mlps = [r for r in result["gemm"] if "mlp_fused_ms" in r]
    if mlps:
        lines += ["## MLP first layer into the next layer's codes (ms)", "",
                  "Unfused: the GEMM writes its 16-bit output, torch's GELU reads and writes it, the next layer's "
                  "activation kernel reads it. Fused: one GEMM whose epilogue applies GELU and quantizes.", ""]
        lines += _md_table(("M×K×N", "unfused", "fused", "fused / unfused"), map(_mlp_cells, mlps))
    if result["transformers"]:
        lines += ["## Transformer forward, batch 1", ""] + _md_table(FORWARD_COLUMNS,
                                                                    map(_forward_cells, result["transformers"]))
    if result["targets"]:
        lines += ["## Targets (issue #4)", ""] + _md_table(
            ("target", "value", "goal", "verdict"),
            ([t["target"], f"{t['value']:.3f}", f"{t['goal']:.3f}", _verdict(t)] for t in result["targets"]))
    for r in result["transformers"]:
        if r.get("profile"):
            lines += [f"## Profile: {r['model']} {r['variant']} eager, one forward", ""] + _md_table(
                ("kernel", "calls", "ms", "share"),
                ([f"`{p['name']}`", str(p["calls"]), f"{p['ms']:.2f}", f"{p['share'] * 100:.1f}%"] for p in r["profile"]))
    if result.get("autotune"):
        lines += ["## Autotuner's choices", ""] + [f"- `{k}`: `{v}`" for k, v in result["autotune"].items()] + [""]
    return "\n".join(lines)


def _verdict(t: dict) -> str:
    return "met" if t["met"] else f"MISSED by {abs(t['value'] - t['goal']) / t['goal'] * 100:.0f}%"


def merge(paths: list[str]) -> dict:
    """One result from piecewise runs (e.g. one device call per part); targets over all their rows."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    devices = {p["device"] for p in parts}
    if len(devices) > 1:
        raise SystemExit(f"refusing to merge runs from different devices: {sorted(devices)}")
    result = {k: parts[0][k] for k in ("device", "torch", "smoke", "dtype")}
    result["timing"] = parts[0].get("timing")
    result["gemm"] = [r for p in parts for r in p["gemm"]]
    result["transformers"] = [r for p in parts for r in p["transformers"]]
    result["autotune"] = {k: v for p in parts for k, v in p.get("autotune", {}).items()}
    result["merged_from"] = [str(p) for p in paths]
    # a part cut off by a time limit keeps the rows it measured; the report says which parts those are
    result["incomplete"] = [str(path) for path, p in zip(paths, parts) if not p.get("complete", True)]
    result["complete"] = not result["incomplete"]
    result["targets"] = targets(result["gemm"], result["transformers"])
    return result


def write_json(result: dict, out: Path) -> None:
    """Atomically (a temporary file renamed over), so a run killed mid-write leaves the last good JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(out)


def write(result: dict, out: Path, md: str | None) -> None:
    write_json(result, out)
    print(f"wrote {out}")
    if md:
        Path(md).parent.mkdir(parents=True, exist_ok=True)
        Path(md).write_text(markdown(result))
        print(f"wrote {md}")


class OutOfTime(Exception):
    """--time-budget-s is spent: stop starting measurements, keep the ones made."""


def main() -> None:
    ap = argparse.ArgumentParser(description="W4A4 kernels and transformers vs BF16 / FP8 / NF4")
    ap.add_argument("--only", choices=["gemm", "flux", "qwen"], action="append")
    ap.add_argument("--smoke", action="store_true", help="toy sizes; runs on CPU to check the script")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--profile", action="store_true", help="top kernels of one BF16 and one INT4 forward")
    ap.add_argument("--variants", default="bf16,int4_r32,nf4,int4_r128,int4_r32_unfused-rope,int4_r32_unfused-mlp,"
                                          "int4_r32_unfused-norm,int4_r32_unfused-gate",
                    help="measured in this order (ablations last); int4_r<rank>_unfused-rope runs diffusers' q/k norm "
                         "+ RoPE, _unfused-mlp the MLPs without the fused GELU epilogue, _unfused-norm diffusers' "
                         "AdaLN norm + modulation, _unfused-gate the gated residual sums as separate ops, _unfused "
                         "none of the fusions")
    ap.add_argument("--compile-variants", default="bf16,int4_r32",
                    help="variants also timed under torch.compile (each compile of a full model takes minutes)")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="start no new measurement after this many seconds; the JSON keeps what was measured "
                         "and says it is incomplete (device calls have a hard time limit)")
    ap.add_argument("--out", default="outputs/bench/gpu.json")
    ap.add_argument("--markdown", help="also write the tables as Markdown here")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="merge these runs' JSON instead of measuring")
    args = ap.parse_args()
    if args.report:
        result = merge(args.report)
        print_tables(result)
        write(result, Path(args.out), args.markdown)
        return
    parts = args.only or ["gemm", "flux", "qwen"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("gpu_bench needs CUDA (this machine has none); use --smoke to check the script on CPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    iters = 1 if args.smoke else args.iters
    variants = args.variants.split(",")
    for v in variants:  # before anything is measured
        if v.startswith("int4_r"):
            int4_variant(v)
        elif v not in ("bf16", "nf4"):
            raise SystemExit(f"unknown variant {v!r}: bf16, nf4 or int4_r<rank>[_{' | _'.join(ABLATIONS)}]")
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})",
              "torch": torch.__version__, "smoke": args.smoke, "dtype": str(dtype), "gemm": [], "transformers": [],
              "complete": False, "timing": TIMING if device.type == "cuda" else "CPU wall clock (smoke: meaningless)"}
    out = Path(args.out)
    started = time.perf_counter()

    def refresh() -> None:
        """What is derived from the rows so far: the autotuner's choices and the targets."""
        if device.type == "cuda":
            from pipeline.kernels.triton_w4a4 import best_configs

            result["autotune"] = best_configs()
        result["targets"] = targets(result["gemm"], result["transformers"])

    def save() -> None:
        """After every row: a run cut off by a device time limit still leaves every row it measured."""
        refresh()
        write_json(result, out)
        row = (result["gemm"] + result["transformers"])[-1]
        print("measured", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "profile"},
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        if args.time_budget_s is not None and time.perf_counter() - started > args.time_budget_s:
            raise OutOfTime(f"time budget of {args.time_budget_s:g} s spent")

    tok, txt = (64, 16) if args.smoke else (4096, 512)
    compile_ = set() if args.no_compile or args.smoke else set(args.compile_variants.split(","))
    try:
        if "gemm" in parts:
            bench_gemm(device, dtype, SMOKE_GEMM_SHAPES if args.smoke else GEMM_SHAPES, iters, rows=result["gemm"],
                       on_row=save)
        if "flux" in parts:
            bench_transformer("flux", SMOKE_FLUX if args.smoke else FLUX_DEV, device, dtype, tok, txt, iters,
                              compile_, variants, args.profile, rows=result["transformers"], on_row=save)
        if "qwen" in parts:
            bench_transformer("qwen-image", SMOKE_QWEN if args.smoke else QWEN_IMAGE, device, dtype, tok,
                              256 if not args.smoke else txt, iters, compile_, variants, args.profile,
                              rows=result["transformers"], on_row=save)
        result["complete"] = True
    except OutOfTime as stop:
        result["stopped"] = str(stop)
        print(f"stopped early: {stop}; the JSON holds the rows measured so far", flush=True)
    refresh()
    print_tables(result)
    write(result, out, args.markdown)


if __name__ == "__main__":
    main()
