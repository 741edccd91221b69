"""report/metrics.json and report/metrics.csv."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from pipeline.outputs.atomic import atomic_write_bytes, atomic_write_json

VARIANT_FIELDS = ("name", "label", "precision", "rank", "status", "pairs", "latency_s", "peak_mem_bytes",
                  "bytes_before", "bytes_after", "weight_ratio")


def variant_row(v: dict[str, Any], names: list[str], set_names: list[str]) -> dict[str, Any]:
    row = {k: v.get(k) for k in VARIANT_FIELDS}
    for n in names:
        s = v["metrics"].get(n) or {}
        row[f"{n}_mean"], row[f"{n}_min"] = s.get("mean"), s.get("min")
    for n in set_names:
        row[n] = v["set_metrics"].get(n)
    return row


def write_tables(data: dict[str, Any], out: Path) -> None:
    names, set_names = data["metric_names"], data["set_metric_names"]
    atomic_write_json(out / "metrics.json", {
        "folder": data["folder"], "reference": data["reference"], "variants": data["variants"],
        "pairs": data["pairs"], "mismatches": data["mismatches"], "skipped": data["skipped"]})
    buf = io.StringIO()
    fields = ["level", *VARIANT_FIELDS, *(f"{n}_{s}" for n in names for s in ("mean", "min")), *set_names,
              "id", "seed", "file", *names]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for v in data["variants"]:
        w.writerow({"level": "variant", **variant_row(v, names, set_names)})
    for p in data["pairs"]:
        w.writerow({"level": "pair", "name": p["variant"], "id": p["id"], "seed": p["seed"], "file": p["file"],
                    **p["metrics"]})
    atomic_write_bytes(out / "metrics.csv", buf.getvalue().encode())
