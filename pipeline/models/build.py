"""One call from a ModelConfig to a ready diffusers pipeline on the chosen device and dtype."""

from __future__ import annotations

import contextlib
import logging

import torch

from pipeline.config.schema import Device, DType, ModelConfig, ModelSource, SamplerConfig
from pipeline.errors import DeviceError

log = logging.getLogger(__name__)

_DTYPES = {DType.float32: torch.float32, DType.bfloat16: torch.bfloat16, DType.float16: torch.float16}


def resolve_device(device: Device) -> torch.device:
    if device == Device.cuda:
        if not torch.cuda.is_available():
            raise DeviceError(
                "sampler.device=cuda but no CUDA device is visible to torch "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
                "Use sampler.device=auto or sampler.device=cpu."
            )
        return torch.device("cuda")
    if device == Device.cpu:
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    if dtype == DType.auto:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def build_pipeline(model: ModelConfig, sampler: SamplerConfig):
    """Build (tiny) or load (pretrained, local only) the whole pipeline on the run's device and dtype."""
    device = resolve_device(sampler.device)
    dtype = resolve_dtype(sampler.dtype, device)
    pipe = load_pipeline(model, sampler, dtype)
    _move(pipe, device, dtype)
    return pipe, device, dtype


def load_pipeline(model: ModelConfig, sampler: SamplerConfig, dtype: torch.dtype, transformer=None):
    """The pipeline in host memory (the caller places it: models/placement.py). A given `transformer` (one built
    from a quantized file) takes the place of the model's own, which is then never read."""
    if model.source == ModelSource.tiny:
        from pipeline.models.tiny import build_tiny

        pipe = build_tiny(model, transformer)
    else:
        pipe = _load_pretrained(model, dtype, transformer)
    pipe.set_progress_bar_config(disable=True)  # our own progress bar counts images
    _apply_scheduler(pipe, sampler)
    return pipe


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers' warnings and progress bars off: the fp32-kept-modules warning on .to() (these models keep none)
    and the per-component loading bars, which our own progress replaces."""
    from diffusers.utils import logging as dlogging

    level, bars = dlogging.get_verbosity(), dlogging.is_progress_bar_enabled()
    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)
        if bars:
            dlogging.enable_progress_bar()


def _move(pipe, device: torch.device, dtype: torch.dtype) -> None:
    """pipe.to() (quantized layers keep their tensors' dtypes: layers.KeepsDtypes)."""
    with quiet_diffusers():
        pipe.to(device=device, dtype=dtype)


def _load_pretrained(model: ModelConfig, dtype: torch.dtype, transformer=None):
    import diffusers

    from pipeline.families import family
    from pipeline.models.pretrained import resolve_model_dir

    folder = resolve_model_dir(model)
    fam = family(model.family)
    cls = getattr(diffusers, fam.pipeline_class)
    given = {} if transformer is None else {"transformer": transformer}
    if fam.pretrained_components is not None:  # e.g. Qwen-Image-Edit's processor without torchvision
        given.update(fam.pretrained_components(folder))
    log.info("Loading %s from %s%s", model.name, folder,
             " (its transformer from the quantized file)" if transformer is not None else "")
    with quiet_diffusers():
        return cls.from_pretrained(folder, dtype=dtype, local_files_only=True, **given)


def _apply_scheduler(pipe, sampler: SamplerConfig) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = sampler.scheduler
    overrides = {}
    if s.shift is not None:
        overrides["shift"] = s.shift
    if s.use_dynamic_shifting is not None:
        overrides["use_dynamic_shifting"] = s.use_dynamic_shifting
    if s.name.value == "flow_match_euler" or overrides:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, **overrides)
