"""The fused modules subclass diffusers' and rewrite some of their forwards (diffusers 0.42). Each rewrite is
used only while diffusers' method takes the arguments it was written from: a diffusers that changed keeps
its own code rather than lose what changed."""

from __future__ import annotations

import inspect


def same_parameters(fn, *names: str) -> bool:
    """Whether `fn` takes exactly these parameters, in this order."""
    return tuple(inspect.signature(fn).parameters) == names
