"""Building the diffusers pipeline a run generates with: tiny in-process models or local real ones."""

from pipeline.models.build import build_pipeline, load_pipeline, resolve_device, resolve_dtype

__all__ = ["build_pipeline", "load_pipeline", "resolve_device", "resolve_dtype"]
