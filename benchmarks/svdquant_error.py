"""Layer-level evidence for SVDQuant: output error of plain W4A4, smoothing-only W4A4 and SVDQuant.

A synthetic linear layer whose activations have a few outlier channels 20-100x the rest (as in
diffusion transformers) and whose weight has a few dominant directions. Errors are relative
Frobenius errors on held-out rows. Prints a table and writes JSON:

    python benchmarks/svdquant_error.py [--out outputs/bench/svdquant_error.json] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from pipeline.progress import ItemLog
from pipeline.quantization.quantizer import ActStats, svdquant_linear

METHODS = [("plain W4A4", dict(rank=0, smooth=False)), ("smoothing W4A4", dict(rank=0))] + [
    (f"SVDQuant r{r}", dict(rank=r)) for r in (8, 16, 32, 64)]


def outlier_layer(seed: int, k: int = 3072 // 4, n: int = 3072 // 4, m: int = 1024):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:8]] *= torch.linspace(20, 100, 8)
    w = torch.randn(n, k, generator=g) / k**0.5
    w = w + 0.3 * (torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g)) / k**0.5
    return w, torch.randn(n, generator=g) * 0.1, x


def run(seeds: int) -> dict:
    rows = []
    lines = ItemLog(2 * len(METHODS) * seeds)  # one stderr line per case: the whole run takes minutes
    for precision in ("int4", "nvfp4"):
        for label, kw in METHODS:
            errs, secs = [], []
            for seed in range(seeds):
                w, b, x = outlier_layer(seed)
                half = x.shape[0] // 2
                stats, held = ActStats(x[:half].abs().amax(0), x[:half]), x[half:]
                ref = held @ w.T + b
                t = time.perf_counter()
                layer, report = svdquant_linear(w, b, stats, precision=precision, **kw)
                secs.append(time.perf_counter() - t)
                errs.append(float((layer(held) - ref).norm() / ref.norm()))
                lines(f"{precision} {label} seed {seed}: rel.err {errs[-1]:.4f}")
            rows.append({"precision": precision, "method": label, "rank": kw["rank"],
                         "rel_error_mean": sum(errs) / len(errs), "rel_error_per_seed": errs,
                         "quantize_s_mean": sum(secs) / len(secs)})
    return {"benchmark": "svdquant_layer_error", "layer": "768x768, 8 outlier channels 20-100x",
            "seeds": seeds, "torch": torch.__version__, "machine": platform.machine(), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/bench/svdquant_error.json")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    result = run(args.seeds)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SVDQuant layer error ({result['layer']}, {args.seeds} seeds, held-out rows)")
    for col in ("precision", "method", "relative error", "vs plain", "quantize s"):
        table.add_column(col, justify="left" if col in ("precision", "method") else "right")
    plain = {r["precision"]: r["rel_error_mean"] for r in result["rows"] if r["method"] == "plain W4A4"}
    for r in result["rows"]:
        table.add_row(r["precision"], r["method"], f"{r['rel_error_mean']:.4f}",
                      f"{plain[r['precision']] / r['rel_error_mean']:.1f}x better" if r["rank"] or "smooth" in r["method"] else "1.0x",
                      f"{r['quantize_s_mean']:.2f}")
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
