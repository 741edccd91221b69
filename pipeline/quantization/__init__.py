"""SVDQuant: decide the plan (plan.py), apply it to a transformer (apply.py)."""

from pipeline.quantization.apply import QuantSummary, module_bytes, quantize_transformer
from pipeline.quantization.plan import QuantPlan, parse_weight_filename, resolve_plan

__all__ = ["QuantPlan", "QuantSummary", "module_bytes", "parse_weight_filename", "quantize_transformer", "resolve_plan"]
