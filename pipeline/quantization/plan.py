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

from pipeline.config.schema import ModelSource, OnTheFly, Precision, QuantizationConfig, QuantMode
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
    decided_by: str = "none"  # none | filename | manual | preset | auto (tiny model quantized in-process)
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


def resolve_plan(q: QuantizationConfig, model_source: ModelSource = ModelSource.tiny) -> QuantPlan:
    """Combine the weight file's name with explicit settings into one QuantPlan (file contents: reconcile())."""
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
        on_the_fly = q.on_the_fly == OnTheFly.always or (
            q.on_the_fly == OnTheFly.tiny and model_source == ModelSource.tiny)
        if requested.get("enable") is False or not on_the_fly:
            return QuantPlan(
                enabled=False,
                decided_by="none",
                requested=requested,
                notes=["quantization=auto with no quantization.path: 16-bit transformer "
                       "(set quantization.path=svdq-*.safetensors, or quantization=int4_r32 to quantize in-process)"],
            )
        precision = requested.get("precision", "int4")
        rank = requested.get("rank", DEFAULT_RANK)
        return QuantPlan(
            enabled=True, precision=precision, rank=rank,
            act_unsigned=requested.get("act_unsigned", precision == "int4"), decided_by="auto",
            requested=requested,
            notes=[f"quantization=auto with no file: quantizing the tiny model in-process ({precision} r{rank})"],
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


def reconcile(plan: QuantPlan, info, force: bool) -> QuantPlan:
    """Check the file's name, header and tensors against each other and the settings; tensors win.

    A disagreement is an error naming both sides, unless `force` is set: then the file's tensors
    are used and the disagreement is kept in the notes.
    """
    found = {"precision": info.precision, "rank": info.rank}
    plan.detected = {"filename": plan.detected, "metadata": {"precision": info.metadata_precision,
                     "rank": info.metadata_rank, "act_unsigned": info.act_unsigned}, "tensors": found}
    conflicts = []
    for key in ("precision", "rank"):
        said = plan.detected["filename"].get(key)
        if said is not None and said != found[key]:
            conflicts.append(f"the file name says {key}={said} but the tensors are {key}={found[key]}")
    conflicts += info.problems  # inside the file: metadata vs tensors (precision, rank, block counts)
    for key in ("precision", "rank"):
        if key in plan.requested and plan.requested[key] != found[key]:
            conflicts.append(f"quantization.{key}={plan.requested[key]} is set but the file's tensors are "
                             f"{key}={found[key]}")
    file_unsigned = info.act_unsigned if info.act_unsigned is not None else info.precision == "int4"
    if "act_unsigned" in plan.requested and plan.requested["act_unsigned"] != file_unsigned:
        conflicts.append(f"quantization.act_unsigned={plan.requested['act_unsigned']} is set but the file was "
                         f"quantized with act_unsigned={file_unsigned}")
    if conflicts and not force:
        raise QuantizationError(
            f"{plan.path}: " + "; ".join(conflicts)
            + ". Fix the setting (or rename the file), or set quantization.force=true to use the file as it is."
        )
    plan.notes += [f"forced: {c}; using the file's tensors" for c in conflicts]
    plan.precision, plan.rank, plan.act_unsigned = found["precision"], found["rank"], file_unsigned
    return plan
