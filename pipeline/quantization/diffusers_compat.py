"""What diffusers' callables take. The fused modules subclass diffusers' and rewrite some of their forwards
(diffusers 0.42); each rewrite is used only while diffusers' method takes the arguments it was written from: a
diffusers that changed keeps its own code rather than lose what changed. Pipelines differ in the arguments
their calls take (FluxFillPipeline and ZImagePipeline have no true_cfg_scale): `takes_argument` says."""

from __future__ import annotations

import inspect


def same_parameters(fn, *names: str) -> bool:
    """Whether `fn` takes exactly these parameters, in this order."""
    return tuple(inspect.signature(fn).parameters) == names


def takes_argument(pipe, name: str) -> bool:
    """Whether a pipeline's call (an instance or the class) has a parameter `name`."""
    cls = pipe if isinstance(pipe, type) else type(pipe)
    return name in inspect.signature(cls.__call__).parameters
