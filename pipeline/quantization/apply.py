"""The one call that turns a loaded diffusers transformer into its SVDQuant form.

Like torchao's `quantize_(model, config)`: the runner calls `quantize_transformer(transformer,
plan)` and gets back a summary for the metadata. The engine (quantizer, Nunchaku checkpoint
reader, W4A4 reference and kernels) plugs in behind this function.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from pipeline.errors import QuantizationError
from pipeline.quantization.plan import QuantPlan


@dataclass
class QuantSummary:
    applied: bool
    layers_swapped: int
    bytes_before: int
    bytes_after: int
    precision: str | None
    rank: int | None
    act_unsigned: bool | None
    backend: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers: what the weights cost in memory."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def quantize_transformer(transformer: torch.nn.Module, plan: QuantPlan) -> QuantSummary:
    """Apply `plan` to `transformer` in place and report what changed."""
    size = module_bytes(transformer)
    if not plan.enabled:
        return QuantSummary(False, 0, size, size, None, None, None, backend="none")
    raise QuantizationError(
        f"SVDQuant {plan.precision} r{plan.rank} was requested ({plan.decided_by}), but this version has no "
        "SVDQuant engine yet, so the 16-bit transformer cannot be replaced. Run with quantization=none "
        "(or quantization=auto without quantization.path)."
    )
