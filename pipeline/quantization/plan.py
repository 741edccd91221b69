"""Decide what quantization a run uses: from the weight file name (auto), or as set (manual).

Follows SGLang's Nunchaku support: a file named `svdq-{precision}_r{rank}-...safetensors` says its
precision and rank; manual settings override it. The decision and how it was made go into the
run metadata.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.config.schema import Precision, QuantizationConfig, QuantMode
from pipeline.errors import QuantizationError

# `fp4` is what Nunchaku's public files call NVFP4.
FILENAME_PATTERN = re.compile(r"svdq-(?P<precision>int4|nvfp4|fp4)_r(?P<rank>\d+)", re.IGNORECASE)
DEFAULT_RANK = 32
LIGHTNING_PATTERN = re.compile(r"lightning", re.IGNORECASE)


@dataclass
class QuantPlan:
    """The quantization a run will apply, with its provenance for metadata."""

    enabled: bool
    precision: Optional[str] = None
    rank: Optional[int] = None
    act_unsigned: Optional[bool] = None
    path: Optional[str] = None
    decided_by: str = "none"  # none | filename | manual | preset
    detected: dict[str, Any] = field(default_factory=dict)  # what the file name said
    requested: dict[str, Any] = field(default_factory=dict)  # what the config set explicitly
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_weight_filename(path: str) -> Optional[dict[str, Any]]:
    """`svdq-int4_r32-qwen-image.safetensors` -> {'precision': 'int4', 'rank': 32}; None if no match."""
    m = FILENAME_PATTERN.search(Path(path).name)
    if not m:
        return None
    precision = m["precision"].lower()
    info: dict[str, Any] = {
        "precision": "nvfp4" if precision in ("fp4", "nvfp4") else "int4",
        "rank": int(m["rank"]),
    }
    if LIGHTNING_PATTERN.search(Path(path).name):
        info["lightning"] = True
    return info


def resolve_plan(q: QuantizationConfig) -> QuantPlan:
    """Combine the weight file's name with explicit settings into one QuantPlan."""
    requested = {
        k: (v.value if isinstance(v, Precision) else v)
        for k, v in (("enable", q.enable), ("precision", q.precision), ("rank", q.rank), ("act_unsigned", q.act_unsigned))
        if v is not None
    }
    if q.mode == QuantMode.none:
        return QuantPlan(enabled=False, decided_by="none", notes=["quantization=none: 16-bit transformer"])

    detected: dict[str, Any] = {}
    if q.path:
        info = parse_weight_filename(q.path)
        if info is None and q.mode == QuantMode.auto and not {"precision", "rank"} <= requested.keys():
            raise QuantizationError(
                f"quantization.path={q.path}: cannot tell precision and rank from the file name "
                "(expected 'svdq-{int4|fp4}_r{rank}-<model>.safetensors'). Rename the file, or set them: "
                "quantization=manual quantization.precision=int4 quantization.rank=32"
            )
        detected = info or {}

    if q.mode == QuantMode.auto and not q.path and not requested.get("enable"):
        return QuantPlan(
            enabled=False,
            decided_by="none",
            requested=requested,
            notes=["quantization=auto with no quantization.path: 16-bit transformer"],
        )

    enabled = requested.get("enable", True)
    precision = requested.get("precision", detected.get("precision"))
    rank = requested.get("rank", detected.get("rank"))
    if enabled and precision is None:
        raise QuantizationError(
            "quantization is enabled but no precision is known: set quantization.precision=int4 or nvfp4, "
            "or point quantization.path at an svdq-{int4|fp4}_r{rank}-*.safetensors file"
        )
    notes = []
    if enabled and rank is None:
        rank = DEFAULT_RANK
        notes.append(f"rank not given: using {DEFAULT_RANK}, Nunchaku's default")
    for key in ("precision", "rank"):
        if key in requested and key in detected and requested[key] != detected[key]:
            notes.append(
                f"{key}={requested[key]} set manually overrides {key}={detected[key]} from the file name"
            )
    act_unsigned = requested.get("act_unsigned", precision == "int4" if enabled else None)
    if act_unsigned and precision == "nvfp4":
        raise QuantizationError("quantization.act_unsigned=true is int4-only; nvfp4 has signed E2M1 codes")
    if detected.get("lightning"):
        notes.append("Lightning checkpoint: use sampler=lightning-4step or lightning-8step")
    if q.preset:
        decided_by = "preset"
    elif requested.keys() & {"precision", "rank", "enable"} or q.mode == QuantMode.manual:
        decided_by = "manual"
    else:
        decided_by = "filename"
    return QuantPlan(
        enabled=bool(enabled),
        precision=precision if enabled else None,
        rank=rank if enabled else None,
        act_unsigned=act_unsigned if enabled else None,
        path=q.path,
        decided_by=decided_by if enabled else "manual",
        detected=detected,
        requested=requested,
        notes=notes,
    )
