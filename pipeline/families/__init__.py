"""Model families: everything specific to one model lives in its module here (base.py says what a family is).

The runner asks this registry about a family by name (`family("flux")`); the SVDQuant engine asks
pipeline.quantization.architecture about a transformer. Adding a family is one new module, imported below,
plus its conf/model/ entries and tests. Input kinds (`inputs_of`):
  text        text-to-image: rows carry no input image
  image       one input image per row (editing)
  images      one or more input images per row (a list; multi-image editing)
  image+mask  an input image and a mask per row (inpainting)
"""

from __future__ import annotations

from pipeline.families.base import INPUT_KINDS, Family, registered

# Each module registers its family (and architecture) on import; the order is the order `names()` lists them.
from pipeline.families import flux, flux_fill, flux_kontext, qwen_image, qwen_image_edit, z_image  # noqa: E402,F401  isort: skip

__all__ = ["INPUT_KINDS", "Family", "family", "inputs_of", "names"]


def names() -> tuple[str, ...]:
    return tuple(registered())


def family(name: str) -> Family:
    """The family called `name` (model.family), or a ValueError listing the known ones."""
    found = registered().get(name)
    if found is None:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(registered())}")
    return found


def inputs_of(name: str) -> str:
    """The input kind of a family (one of INPUT_KINDS)."""
    return family(name).inputs
