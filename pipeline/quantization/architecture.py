"""What the engine needs to know about a transformer architecture, and the registry that answers it.

Why: the engine (targets, quantizer, checkpoint reader/writer, fused forwards' installers) is the same for every
model; what differs (which linears are quantized and under which names, how files name and recognise them, which
diffusers modules get fused subclasses) is described by one `Architecture` per transformer class, written in that
model family's module (pipeline/families/). Nothing in this package names a family: it looks architectures up here.
Several model families may share one architecture (FLUX.1-dev, Kontext and Fill are all FluxTransformer2DModel).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn

from pipeline.quantization.file_names import LegacyNames
from pipeline.quantization.targets import Target


@dataclass(frozen=True)
class Fusions:
    """The family's fused forwards, for the installers in fused_qkv.py, fused_block.py and fused_mlp.py.

    qkv_attention(attn) -> bool: the attention module can run its fused q/k/v layers (`to_qkv`, `to_added_qkv`);
    qkv_installed(attn, ready): called after each fused layer is set on it (`ready`: every stream now fused).
    blocks: diffusers block class -> its subclass with the gated residual sums in GEMM epilogues.
    mlp_owners: diffusers module class -> (fused subclass, test that the module's layers allow it), for MLPs
    other than diffusers' FeedForward (which the engine fuses itself)."""

    qkv_attention: Optional[Callable[[nn.Module], bool]] = None
    qkv_installed: Optional[Callable[[nn.Module, bool], None]] = None
    blocks: dict[type, type] = field(default_factory=dict)
    mlp_owners: dict[type, tuple[type, Callable[[nn.Module], bool]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Architecture:
    """One transformer architecture as the engine and its files see it."""

    name: str  # the family name files record and messages use ("flux")
    transformer_class: str  # diffusers' class name
    targets: Callable[[nn.Module], list[Target]]  # the SVDQuant targets under Nunchaku's names
    model_class: str  # the `model_class` metadata written into files
    owns_keys: Callable[[list[str]], bool]  # do a file's tensor names belong to this architecture?
    model_classes: tuple[str, ...] = ()  # other `model_class` strings seen in files of this architecture
    block_stacks: dict[str, str] = field(default_factory=dict)  # module list -> config key counting it
    naming: str = "diffusers"  # the tensor naming written by default (legacy where Nunchaku reads only that)
    legacy_names: Optional[LegacyNames] = None  # the per-block legacy naming, where the architecture has one
    comfy_config: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None  # `comfy_config` metadata
    unfolded_diffusers_files: bool = False  # diffusers-named files hold the AdaLN scale bias without the +1
    # W4A4 layers whose linears have no bias get a zero `.bias` in files (the engine's layers always have one);
    # False: only a layer with a bias carries one (the engine builds bias-less layers and loads files strictly)
    zero_bias: bool = True
    fusions: Callable[[], Fusions] = Fusions  # the fused forwards (called when installing: imports diffusers)
    engine_class: Optional[str] = None  # the real Nunchaku engine's transformer class, where it has one
    checked_against: str = ""  # what the target layout was checked against (README, inspect)


_BY_NAME: dict[str, Architecture] = {}
_BY_CLASS: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    """Called by a family module at import; the first registration of a transformer class wins."""
    _BY_NAME.setdefault(arch.name, arch)
    _BY_CLASS.setdefault(arch.transformer_class, arch)
    return arch


def _registered() -> None:
    import pipeline.families  # noqa: F401  (imports every family module, which registers its architecture)


def architectures() -> list[Architecture]:
    _registered()
    return list(_BY_NAME.values())


def architecture(name: str) -> Architecture:
    _registered()
    if name not in _BY_NAME:
        raise ValueError(f"no architecture named {name!r}; known: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def architecture_of(transformer: nn.Module) -> Architecture:
    """The architecture of a diffusers transformer (by its class, or the class it was made from)."""
    _registered()
    for cls in type(transformer).__mro__:
        if cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__]
    raise ValueError(f"SVDQuant supports {', '.join(_BY_CLASS)}; got {type(transformer).__name__}")


def architecture_of_file(keys: list[str], model_class: Optional[str]) -> Optional[Architecture]:
    """The architecture a file's tensor names belong to, else the one its `model_class` metadata names."""
    _registered()
    for arch in _BY_NAME.values():
        if arch.owns_keys(keys):
            return arch
    wanted = (model_class or "").lower()
    for arch in _BY_NAME.values():
        if wanted and wanted in {c.lower() for c in (arch.model_class, *arch.model_classes)}:
            return arch
    return None
