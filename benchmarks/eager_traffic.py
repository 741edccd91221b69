"""Memory traffic of one eager transformer forward, by kind of work, measured on CPU without a GPU.

    python benchmarks/eager_traffic.py                         # FLUX.1-dev and Qwen-Image size, 1024², batch 1
    python benchmarks/eager_traffic.py --models flux --json outputs/bench/traffic.json

The transformer is built on PyTorch's meta device (shapes, no data) and run once under a dispatch mode
that records every operator eager PyTorch would launch, with the bytes it reads and writes (views move
nothing). Our quantized layers run as the custom ops the GPU would launch (their fake kernels give the
shapes). Work is grouped as: GEMMs (and our quantized layers, activation quantization included),
attention (scaled_dot_product_attention, not run), q/k preparation inside the attention processor (norms,
RoPE, concatenation), and everything else (norms, modulation, gates, residuals, GELU, copies).

Outside GEMMs and attention, eager kernels are memory-bound, so bytes are what costs time there. The
estimate column divides them by the bandwidth that makes this count match the BF16 FLUX.1-dev anchor
measured on an H100 (42% of 182 ms outside GEMMs and attention, ../shared/docs/gpu-anchors.md): an
estimate, not a measurement (`gpu_bench.py` measures).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_bench import FLUX_DEV, QWEN_IMAGE, fusions_off, install_targets_, int4_variant  # noqa: E402

ANCHOR_OTHER_MS = 0.42 * 182.0  # BF16 FLUX.1-dev eager on an H100: the time outside GEMMs and attention
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::_scaled_mm", "svdq::w4a4_linear",
            "svdq::w4a4_linear_joint", "svdq::w4a4_gemm", "svdq::w4a4_gelu_quant", "svdq::awq_w4a16_gemv"}
ATTENTION_MODULES = {"FluxAttention", "QwenAttention", "Attention"}
# Operators whose output is a view (or the input itself) move no bytes.
VIEWS = {"view", "reshape", "unflatten", "flatten", "unsqueeze", "squeeze", "expand", "permute", "transpose", "t",
         "select", "slice", "split", "split_with_sizes", "unbind", "chunk", "alias", "detach", "_unsafe_view",
         "as_strided", "view_as", "view_as_real", "view_as_complex", "narrow"}
NO_DATA = {"empty", "empty_like", "empty_strided", "new_empty", "zeros", "ones", "full", "arange"}
KINDS = ("GEMM", "attention", "q/k norm + RoPE", "other")


class _Traffic(TorchDispatchMode):
    """Bytes each launched operator reads and writes, filed under the kind of work it belongs to."""

    def __init__(self, stack: list[str]):
        super().__init__()
        self.stack = stack
        self.bytes: collections.Counter = collections.Counter()
        self.launches: collections.Counter = collections.Counter()
        self.by_op: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        short = name.split("::")[-1]
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if short in VIEWS or short in NO_DATA or (short in ("to", "contiguous", "dropout") and out is inputs[0]):
            return out
        if short == "dropout" and not args[2]:  # eval-mode dropout: returns its input, launches nothing on CUDA
            return out
        moved = sum(t.numel() * t.element_size() for t in inputs + [t for t in tree_leaves(out)
                                                                    if isinstance(t, torch.Tensor)])
        kind = "GEMM" if name in GEMM_OPS else ("q/k norm + RoPE" if ATTENTION_MODULES & set(self.stack) else "other")
        self.bytes[kind] += moved
        self.launches[kind] += 1
        self.by_op[f"{kind}: {name}"] += moved
        return out


class _Attention(TorchFunctionMode):
    """scaled_dot_product_attention recorded as one launch and not run (on meta it would decompose)."""

    def __init__(self, traffic: _Traffic):
        super().__init__()
        self.traffic = traffic

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args):])[:3]
            self.traffic.bytes["attention"] += sum(t.numel() * t.element_size() for t in (q, k, v, q))
            self.traffic.launches["attention"] += 1
            return torch.empty_like(q)
        return func(*args, **kwargs)


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def build(family: str, config: dict, variant: str):
    """The transformer on the meta device; int4 variants (gpu_bench's names) get every quantization target as the
    GPU runs it."""
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    from pipeline.quantization.layers import AWQW4A16Linear, SVDQW4A4Linear
    from pipeline.quantization.numerics import GELU_SHIFT

    cls = FluxTransformer2DModel if family == "flux" else QwenImageTransformer2DModel
    with torch.device("meta"):
        model = cls(**config).to(torch.bfloat16).eval()
    if variant == "bf16":
        return model
    rank, off = int4_variant(variant)

    def svdq(n, k, after_gelu):
        return SVDQW4A4Linear(precision="int4", qweight=_meta(n, k, dtype=torch.int8), wscales=_meta(n, k // 64),
                              smooth=_meta(k), proj_down=_meta(k, rank), proj_up=_meta(n, rank), bias=_meta(n),
                              act_unsigned=after_gelu, act_shift=GELU_SHIFT if after_gelu else 0.0)

    def awq(n, k):
        return AWQW4A16Linear(qweight=_meta(n, k, dtype=torch.uint8), wscales=_meta(n, k // 64),
                              wzeros=_meta(n, k // 64), bias=_meta(n, dtype=torch.float32))

    with fusions_off(off):
        install_targets_(model, svdq, awq)
    return model


def inputs(family: str, config: dict, tokens: int, text_tokens: int) -> dict:
    hid, txt = _meta(1, tokens, config["in_channels"]), _meta(1, text_tokens, config["joint_attention_dim"])
    if family == "flux":
        return dict(hidden_states=hid, encoder_hidden_states=txt, timestep=_meta(1),
                    img_ids=_meta(tokens, 3, dtype=torch.float32), txt_ids=_meta(text_tokens, 3, dtype=torch.float32),
                    pooled_projections=_meta(1, config["pooled_projection_dim"]), guidance=_meta(1))
    side = int(tokens**0.5)
    return dict(hidden_states=hid, encoder_hidden_states=txt, timestep=_meta(1),
                encoder_hidden_states_mask=_meta(1, text_tokens), img_shapes=[(1, side, side)])


def measure(family: str, config: dict, variant: str, tokens: int = 4096, text_tokens: int = 512) -> dict:
    """One forward's bytes and launches per kind of work (and the ten largest operators)."""
    from torch.nn.modules import module as M

    from pipeline.kernels import dispatch

    model = build(family, config, variant)
    stack: list[str] = []
    traffic = _Traffic(stack)
    hooks = [M.register_module_forward_pre_hook(lambda mod, args: stack.append(type(mod).__name__)),
             M.register_module_forward_hook(lambda mod, args, out: stack.pop() and None)]
    runs_on = dispatch._triton_runs_on
    dispatch._triton_runs_on = lambda device: True  # run the layers as the GPU would: our kernels' custom ops
    try:
        with torch.inference_mode(), _Attention(traffic), traffic:
            model(**inputs(family, config, tokens, text_tokens))
    finally:
        dispatch._triton_runs_on = runs_on
        for h in hooks:
            h.remove()
    return {"model": family, "variant": variant, "gb": {k: traffic.bytes[k] / 1e9 for k in KINDS},
            "launches": {k: traffic.launches[k] for k in KINDS},
            "top": {k: round(v / 1e9, 3) for k, v in traffic.by_op.most_common(10)}}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=["flux", "qwen-image"], default=["flux", "qwen-image"])
    ap.add_argument("--variants", nargs="+", default=["bf16", "int4_r32", "int4_r32_unfused-rope",
                                                      "int4_r32_unfused-mlp", "int4_r32_unfused-norm",
                                                      "int4_r32_unfused-gate", "int4_r32_unfused"])
    ap.add_argument("--tiny", action="store_true", help="one block of each kind, small widths (the tests)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    configs = {"flux": FLUX_DEV, "qwen-image": QWEN_IMAGE}
    if args.tiny:
        from gpu_bench import SMOKE_FLUX, SMOKE_QWEN

        configs = {"flux": SMOKE_FLUX, "qwen-image": SMOKE_QWEN}
    tokens, text = (64, 16) if args.tiny else (4096, 512)
    from pipeline.progress import ItemLog

    lines = ItemLog(len(args.models) * len(args.variants))  # stderr: stdout is the table
    rows = []
    for m in args.models:
        for v in args.variants:
            rows.append(measure(m, configs[m], v, tokens, text if m == "flux" or args.tiny else 256))
            lines(f"{m} {v}")
    anchor = next((r for r in rows if (r["model"], r["variant"]) == ("flux", "bf16")), None)
    bandwidth = None
    if anchor and not args.tiny:
        bandwidth = (anchor["gb"]["q/k norm + RoPE"] + anchor["gb"]["other"]) / (ANCHOR_OTHER_MS / 1e3)  # GB/s
    print(f"{'model':<11} {'variant':<22}" + "".join(f"{k + ' GB':>19}" for k in KINDS)
          + f"{'launches':>9}{'est. ms outside':>16}")
    for r in rows:
        outside = r["gb"]["q/k norm + RoPE"] + r["gb"]["other"]
        r["est_ms_outside_gemm_attention"] = outside / bandwidth * 1e3 if bandwidth else None
        est = f"{r['est_ms_outside_gemm_attention']:.1f}" if bandwidth else "-"
        print(f"{r['model']:<11} {r['variant']:<22}" + "".join(f"{r['gb'][k]:>19.2f}" for k in KINDS)
              + f"{sum(r['launches'].values()):>9}{est:>16}")
    if bandwidth:
        print(f"estimate: bytes outside GEMMs and attention at {bandwidth:.0f} GB/s, the rate at which BF16 "
              f"FLUX.1-dev's count matches its measured {ANCHOR_OTHER_MS:.0f} ms on an H100 (not a measurement)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"anchor_bandwidth_gb_s": bandwidth, "rows": rows},
                                        indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
