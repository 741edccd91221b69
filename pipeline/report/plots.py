"""Plots of the report, each as PNG and SVG (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, out: Path, name: str, made: list[str]) -> None:
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(out / "plots" / f"{name}.{ext}", dpi=100)
    plt.close(fig)
    made.append(f"plots/{name}.png")


def _bars(variants, values, title, ylabel, out, name, made) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [v["label"] for v in variants]
    ax.bar(range(len(labels)), [0 if x is None else x for x in values], color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    _save(fig, out, name, made)


def write_plots(data: dict[str, Any], out: Path) -> list[str]:
    (out / "plots").mkdir(parents=True, exist_ok=True)
    made: list[str] = []
    variants = data["variants"]
    everyone = [data["reference"], *variants]
    # quality against rank, one line per precision
    for name in data["metric_names"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for prec in sorted({v["precision"] for v in variants}):
            pts = sorted((v["rank"] or 0, v["metrics"][name]["mean"]) for v in variants
                         if v["precision"] == prec and name in v["metrics"])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=prec)
        ax.set_xlabel("rank")
        ax.set_ylabel(f"{name} (mean vs 16-bit)")
        ax.set_title(f"{name} against rank and precision")
        ax.legend()
        _save(fig, out, f"{name}_vs_rank", made)
    _bars(everyone, [v["latency_s"] for v in everyone], "latency per image", "seconds", out, "latency", made)
    _bars(everyone, [(v["peak_mem_bytes"] or 0) / 2**20 for v in everyone], "peak memory", "MiB", out,
          "peak_memory", made)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [v["label"] for v in everyone]
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], [(v["bytes_before"] or 0) / 2**20 for v in everyone], 0.4, label="16-bit")
    ax.bar([i + 0.2 for i in x], [(v["bytes_after"] or 0) / 2**20 for v in everyone], 0.4, label="as run")
    ax.set_xticks(list(x), labels, rotation=20)
    ax.set_ylabel("transformer weights, MiB")
    ax.set_title("weight bytes (bytes_after / bytes_before)")
    ax.legend()
    _save(fig, out, "weight_bytes", made)
    if data["metric_names"]:
        name = "lpips" if "lpips" in data["metric_names"] else data["metric_names"][0]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for v in variants:
            if name in v["metrics"] and v["latency_s"] is not None:
                ax.scatter(v["latency_s"], v["metrics"][name]["mean"])
                ax.annotate(v["label"], (v["latency_s"], v["metrics"][name]["mean"]), fontsize=8)
        ax.set_xlabel("latency per image, s")
        ax.set_ylabel(f"{name} (mean)")
        ax.set_title("quality against speed")
        _save(fig, out, "quality_vs_speed", made)
    return made
