"""SVDQuant: decide the plan (plan.py), apply it (apply.py), and the engine behind it.

numerics.py (4-bit formats, W4A4 product) -> layers.py (reference modules) -> quantizer.py (one
layer) -> targets.py / transform.py / calibration.py (a whole transformer) -> packing.py /
checkpoint.py (Nunchaku files) -> backend.py (which engine, which hardware).
"""

from pipeline.quantization.apply import (QuantSummary, SVDQuantConfig, load_quantized_, module_bytes, quantize_,
                                         quantize_in_process)
from pipeline.quantization.plan import QuantPlan, parse_weight_filename, reconcile, resolve_plan

__all__ = ["QuantPlan", "QuantSummary", "SVDQuantConfig", "load_quantized_", "module_bytes", "parse_weight_filename",
           "quantize_", "quantize_in_process", "reconcile", "resolve_plan"]
