"""Regenerate tests/data/nunchaku_tensors/*.json.gz: the tensors a real merged Nunchaku file holds.

    python tests/data/make_nunchaku_tensor_lists.py \\
        --nunchaku /path/to/nunchaku-checkout --deepcompressor /path/to/deepcompressor-checkout

Why: our checkpoint reader must accept exactly the tensors published files carry. We cannot download
those files, so the list is derived from the two programs that write and read them, each checked
against the other. Sources (line numbers at nunchaku 3a3cc3d and deepcompressor 69f3473):

FLUX (files use the legacy names written by DeepCompressor's Nunchaku writer):
- One full-size double block and one single block are built from the diffusers config, patched the
  way DeepCompressor patches the model before quantizing: the single block's proj_out split into a
  ConcatLinear (deepcompressor/app/diffusion/nn/patch.py:69, nn/patch/linear.py:10-67, bias only on
  the last part at :30) and, for INT4 (examples/diffusion/configs/svdquant/int4.yaml:24-25
  shift_activations), the MLP down projections wrapped in ShiftedLinear (app/diffusion/nn/patch.py:
  73-104, nn/patch/linear.py:70-128; shift 0.171875 = -lowerbound of gelu, nn/struct/attn.py:146-147).
- Scales are given as DeepCompressor stores them, `<module>.weight.scale.<i>` (app/diffusion/quant/
  weight.py:282, data/scale.py:71-90): INT4 scale.0 (N,1,K/64,1) (configs/svdquant/int4.yaml:2-11); NVFP4
  scale.0 per-tensor and scale.1 (N,1,K/16,1) (configs/svdquant/nvfp4.yaml:2-14); the AdaLN linears
  sint4 group 64 in both (nvfp4.yaml:26-39 extra_wgts; not skipped for weights in configs/model/
  flux.1-dev.yaml:20-27). Smoothing factors (K,) per module, low-rank branches {"a.weight": (R,K),
  "b.weight": (N,R)} keyed by module, with one branch spanning the fused q/k/v output per stream
  (app/diffusion/quant/weight.py:53-72, 104-123).
- DeepCompressor's own `convert_to_nunchaku_flux_state_dicts` (backend/nunchaku/convert.py:347-380,
  via :221-344, :119-218, :13-72 and :75-106) converts them; per-block keys are then repeated over
  all blocks, and the unquantized rest is its `other` dict (convert.py:355-360), bf16 as the model.
- Cross-check: Nunchaku's v2 loader path is replayed on the meta device: build from the config
  (nunchaku/models/transformers/utils.py:50-59), `_patch_model(precision, rank)`
  (transformer_flux_v2.py:350-370, as from_pretrained does at :411-419), `convert_flux_state_dict`
  (:564-633, called at :422), `patch_scale_key` (utils.py:151-173: a missing `wcscales` is filled
  with ones, `wtscale` is popped, default 1.0) and a strict `load_state_dict` (:426). It fails on any
  key, shape or dtype the two sources disagree on.

Qwen-Image: DeepCompressor 69f3473 has no Qwen-Image writer (backend/nunchaku/convert.py is
FLUX-only, :399), so the list is Nunchaku's own model: build from the config, `_patch_model`
(transformer_qwenimage.py:339-357, called at :400), state_dict; files use these names unconverted
(patch_scale_key and load_state_dict at :408-410). Its NVFP4 list therefore carries `wcscales` on every
W4A4 layer and no `wtscale`; the loader also accepts files with a `wcscales` missing or a `wtscale`.

Nunchaku's compiled extension is replaced by stubs (`nunchaku._C`, `nunchaku._C.ops`,
`nunchaku._C.utils`) so the Python modules import on CPU; nothing here calls a kernel.
DeepCompressor is imported with its package __init__ files skipped (see import_deepcompressor).
Output: per model/precision/rank a gzip'd JSON list, sorted by name, of [name, shape, dtype string].
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import sys
import types
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # DeepCompressor's converter shows tqdm bars per block

import torch
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle
from diffusers.utils import logging as diffusers_logging

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "pipeline" / "models" / "configs"
OUT_DIR = Path(__file__).with_name("nunchaku_tensors")
FLUX_MODELS = ("flux.1-dev", "flux.1-schnell")
QWEN_MODELS = ("qwen-image",)
VARIANTS = (("int4", 32), ("int4", 128), ("nvfp4", 32))
GELU_SHIFT = 0.171875  # -infer_lowerbound("gelu"), deepcompressor/nn/struct/attn.py:146-147
QKV_GROUPS = (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"))
KNOWN_FILES = {  # published file facts from ../shared/docs/nunchaku-format.md, printed for comparison
    ("flux.1-dev", "int4", 32): "2604 tensors, about 6.77 GB",
    ("qwen-image", "int4", 32): "4093 tensors, about 11.5 GB",
}


def import_nunchaku(checkout: Path) -> types.SimpleNamespace:
    """Nunchaku's transformer classes and loader helpers, with its compiled extension stubbed out."""

    def stub(name: str) -> types.ModuleType:
        module = types.ModuleType(name)

        def missing(attribute: str):
            if attribute.startswith("__"):
                raise AttributeError(attribute)

            def unavailable(*args, **kwargs):
                raise RuntimeError(f"{name}.{attribute} is a CPU stub of Nunchaku's compiled extension")

            return unavailable

        module.__getattr__ = missing
        sys.modules[name] = module
        return module

    extension = stub("nunchaku._C")
    extension.ops, extension.utils = stub("nunchaku._C.ops"), stub("nunchaku._C.utils")
    sys.path.insert(0, str(checkout))
    import nunchaku
    from nunchaku.models.transformers.transformer_flux_v2 import (
        NunchakuFluxTransformer2DModelV2,
        convert_flux_state_dict,
    )
    from nunchaku.models.transformers.transformer_qwenimage import NunchakuQwenImageTransformer2DModel
    from nunchaku.models.transformers.utils import patch_scale_key

    if not Path(nunchaku.__file__).resolve().is_relative_to(checkout):
        raise SystemExit(f"imported nunchaku from {nunchaku.__file__}, not from {checkout}")
    return types.SimpleNamespace(flux=NunchakuFluxTransformer2DModelV2, qwen=NunchakuQwenImageTransformer2DModel,
                                 convert_flux_state_dict=convert_flux_state_dict, patch_scale_key=patch_scale_key)


def import_deepcompressor(checkout: Path) -> types.SimpleNamespace:
    """DeepCompressor's FLUX writer and its two module patches; the packages above them are empty shells
    so their __init__ files (which import DeepCompressor's heavy dependencies) never run."""
    for package in ("deepcompressor", "deepcompressor.backend", "deepcompressor.nn", "deepcompressor.nn.patch"):
        folder = checkout.joinpath(*package.split("."))
        if not folder.is_dir():
            raise SystemExit(f"not a DeepCompressor checkout: {folder} is missing")
        shell = types.ModuleType(package)
        shell.__path__ = [str(folder)]
        sys.modules[package] = shell
    from deepcompressor.backend.nunchaku.convert import convert_to_nunchaku_flux_state_dicts
    from deepcompressor.nn.patch.linear import ConcatLinear, ShiftedLinear

    return types.SimpleNamespace(convert=convert_to_nunchaku_flux_state_dicts, ConcatLinear=ConcatLinear,
                                 ShiftedLinear=ShiftedLinear)


def read_config(model: str) -> dict:
    return json.loads((CONFIGS / f"{model}.json").read_text())


def meta_model(cls, config: dict) -> torch.nn.Module:
    """The model as Nunchaku's _build_model makes it: from the config on the meta device, in bf16."""
    with torch.device("meta"):
        return cls.from_config(config).to(torch.bfloat16)


def patched_model(cls, config: dict, precision: str, rank: int) -> torch.nn.Module:
    """The model the loader fills: built, then patched with SVDQuant/AWQ layers as from_pretrained does."""
    model = meta_model(cls, config)
    model._patch_model(precision=precision, rank=rank)
    return model


def materialise(module: torch.nn.Module) -> torch.nn.Module:
    """A meta module on the CPU with every tensor zero: zero weights quantize exactly in any format."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            tensor.zero_()
    return module


def deepcompressor_patch(double, single, dc, shifted: bool) -> None:
    """Apply DeepCompressor's pre-quantization rewrites: proj_out split in two; INT4 MLP inputs shifted."""
    single.proj_out = dc.ConcatLinear.from_linear(single.proj_out, [single.proj_out.out_features])
    if shifted:
        double.ff.net[2] = dc.ShiftedLinear.from_linear(double.ff.net[2], shift=GELU_SHIFT)
        double.ff_context.net[2] = dc.ShiftedLinear.from_linear(double.ff_context.net[2], shift=GELU_SHIFT)
        single.proj_out.linears[1] = dc.ShiftedLinear.from_linear(single.proj_out.linears[1], shift=GELU_SHIFT)


def quantization_dicts(prefix: str, block: torch.nn.Module, precision: str, rank: int):
    """scale/smooth/branch dicts for every linear of one block, shaped as DeepCompressor saves them."""
    adanorm = {id(m.linear) for m in block.modules() if isinstance(m, (AdaLayerNormZero, AdaLayerNormZeroSingle))}
    linears = {f"{prefix}.{name}": m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    group_out = {}
    for group in QKV_GROUPS:
        for path, m in linears.items():
            if path.rsplit(".", 1)[-1] == group[0]:
                siblings = [linears.get(path[: -len(group[0])] + name) for name in group]
                total = sum(s.out_features for s in siblings if s is not None)
                group_out.update({path[: -len(group[0])] + name: total for name in group})
    scales, smooth, branch = {}, {}, {}
    for path, m in linears.items():
        n, k = m.out_features, m.in_features
        if id(m) in adanorm or precision == "int4":
            scales[f"{path}.weight.scale.0"] = torch.ones(n, 1, k // 64, 1)
        else:
            scales[f"{path}.weight.scale.0"] = torch.ones(1, 1, 1, 1)
            scales[f"{path}.weight.scale.1"] = torch.ones(n, 1, k // 16, 1)
        if id(m) in adanorm:
            continue  # W4A16: no smoothing, no low-rank branch
        smooth[path] = torch.ones(k, dtype=torch.bfloat16)
        branch[path] = {"a.weight": torch.zeros(rank, k, dtype=torch.bfloat16),
                        "b.weight": torch.zeros(group_out.get(path, n), rank, dtype=torch.bfloat16)}
    return scales, smooth, branch


def deepcompressor_flux_file(config: dict, nunchaku, dc, precision: str, rank: int) -> dict[str, tuple]:
    """name -> (shape, dtype) of a merged FLUX file, from DeepCompressor's writer run on one block of each kind."""
    source = meta_model(nunchaku.flux, config)
    other_meta = {name: t for name, t in source.state_dict().items()
                  if not name.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    double = materialise(source.transformer_blocks[0])
    single = materialise(source.single_transformer_blocks[0])
    deepcompressor_patch(double, single, dc, shifted=precision == "int4")
    state_dict, scale_dict, smooth_dict, branch_dict = dict(other_meta), {}, {}, {}
    for prefix, block in (("transformer_blocks.0", double), ("single_transformer_blocks.0", single)):
        state_dict.update({f"{prefix}.{name}": t for name, t in block.state_dict().items()})
        scales, smooth, branch = quantization_dicts(prefix, block, precision, rank)
        scale_dict.update(scales)
        smooth_dict.update(smooth)
        branch_dict.update(branch)
    with contextlib.redirect_stdout(io.StringIO()):
        converted, other = dc.convert(state_dict=state_dict, scale_dict=scale_dict, smooth_dict=smooth_dict,
                                      branch_dict=branch_dict, float_point=precision == "nvfp4")
    entries = {name: (tuple(t.shape), t.dtype) for name, t in other.items()}
    counts = {"transformer_blocks": config["num_layers"], "single_transformer_blocks": config["num_single_layers"]}
    for name, t in converted.items():
        kind, index, local = name.split(".", 2)
        assert index == "0", name
        for i in range(counts[kind]):
            entries[f"{kind}.{i}.{local}"] = (tuple(t.shape), t.dtype)
    return entries


def meta_tensors(entries: dict[str, tuple]) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in entries.items()}


def loader_accepts(model: torch.nn.Module, file_state: dict[str, torch.Tensor], patch_scale_key) -> dict:
    """Replay the loader's last steps; raises if a key, shape or dtype does not fit the patched model."""
    expected = set(model.state_dict())
    given = set(file_state)
    patch_scale_key(model, file_state)  # fills missing wcscales, pops wtscale, asserts equal dtypes
    model.load_state_dict(file_state, strict=True, assign=True)  # missing/unexpected keys, shapes
    return {"filled_wcscales": len(expected - given), "popped_wtscale": len(given - expected)}


def flux_entries(model_name: str, nunchaku, dc, precision: str, rank: int, checks: dict) -> dict[str, tuple]:
    config = read_config(model_name)
    entries = deepcompressor_flux_file(config, nunchaku, dc, precision, rank)
    model = patched_model(nunchaku.flux, config, precision, rank)
    accepted = loader_accepts(model, nunchaku.convert_flux_state_dict(meta_tensors(entries)), nunchaku.patch_scale_key)
    checks[(model_name, precision, rank)] = accepted
    return entries


def qwen_entries(model_name: str, nunchaku, precision: str, rank: int, checks: dict) -> dict[str, tuple]:
    config = read_config(model_name)
    state = patched_model(nunchaku.qwen, config, precision, rank).state_dict()
    entries = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    fresh = patched_model(nunchaku.qwen, config, precision, rank)
    checks[(model_name, precision, rank)] = loader_accepts(fresh, meta_tensors(entries), nunchaku.patch_scale_key)
    return entries


def write_list(path: Path, entries: dict[str, tuple]) -> None:
    """Sorted [name, shape, dtype] rows, one per line, gzip'd with a fixed header so reruns are identical."""
    rows = [json.dumps([name, list(shape), str(dtype)]) for name, (shape, dtype) in sorted(entries.items())]
    text = ("[\n" + ",\n".join(rows) + "\n]\n").encode()
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(text)


def total_bytes(entries: dict[str, tuple]) -> int:
    return sum(torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
               for shape, dtype in entries.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nunchaku", type=Path, required=True, help="Nunchaku source checkout (3a3cc3d)")
    parser.add_argument("--deepcompressor", type=Path, required=True, help="DeepCompressor source checkout (69f3473)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()
    # DeepCompressor's pad() (backend/utils.py:51) indexes with a list of slices; torch warns, the result is right
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
    torch.manual_seed(0)  # nothing random is used; fixed anyway
    nunchaku = import_nunchaku(args.nunchaku.resolve())
    dc = import_deepcompressor(args.deepcompressor.resolve())
    args.out.mkdir(parents=True, exist_ok=True)

    checks: dict = {}
    print(f"{'file':<34} {'tensors':>7} {'bytes':>14} {'GB':>7} {'GiB':>7}  loader")
    for model_name in FLUX_MODELS + QWEN_MODELS:
        for precision, rank in VARIANTS:
            if model_name in FLUX_MODELS:
                entries = flux_entries(model_name, nunchaku, dc, precision, rank, checks)
            else:
                entries = qwen_entries(model_name, nunchaku, precision, rank, checks)
            path = args.out / f"{model_name}_{precision}_r{rank}.json.gz"
            write_list(path, entries)
            size = total_bytes(entries)
            known = KNOWN_FILES.get((model_name, precision, rank), "")
            print(f"{path.name:<34} {len(entries):>7} {size:>14} {size / 1e9:>7.3f} {size / 2**30:>7.3f}  "
                  f"{checks[(model_name, precision, rank)]}{'  known: ' + known if known else ''}")


if __name__ == "__main__":
    main()
