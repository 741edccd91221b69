"""What a run will hold on the device, estimated before anything is loaded.

Weights come from safetensors headers (or in-process modules), never from loading them; activations from the
run's resolution and batch size. pipeline/models/placement.py turns the estimate into a placement.

Activation estimate (bytes; a = bytes per element of the run dtype, B = images per pipeline call):
  denoise = B * (H/16 * W/16 + T + E) * D * a * 20  tokens: one per 16x16 pixels (8x VAE, 2x2 patches) plus
                                                     T text tokens, plus E an edit model's input images add
                                                     (their latents; Qwen-Image-Edit's vision tokens: each
                                                     family's extra_tokens); D = heads * head_dim (3072);
                                                     20 live (B, S, D) tensors: a block's residual, norm, q/k/v,
                                                     attention out, 4D MLP hidden and its activation, the
                                                     single-block concat, fp32 norm upcasts. Attention is
                                                     O(S) (SDPA flash / memory-efficient kernels on CUDA).
                                                     True CFG runs the two branches one after the other
                                                     (diffusers' FluxPipeline and QwenImagePipeline), so it
                                                     does not double this.
  text    = B * T * sum(text widths) * a * 32        MLP intermediates (up to 5x width, gated) plus every
                                                     layer's hidden state, which Qwen-Image's encode keeps
                                                     (output_hidden_states=True, 29 layers).
  vae     = b * h * w * C * a * 8                    decoder activations at full resolution (C = its top channel
                                                     count: FLUX.1 128, Qwen-Image 96), 8 live tensors in a
                                                     resnet block; b = B, or 1 with slicing; h*w = H*W, or one
                                                     tile with tiling (FLUX.1's VAE tiles at its 1024 px
                                                     sample size, Qwen-Image's at 256 px).
Phases do not overlap (encode, then denoise, then decode), so a placement needs its resident weights plus the
largest activation among the phases it runs on the device. Sequential offload is bounded by one transformer
block (a leaf module is smaller); a text encoder's embedding can be larger (Qwen2.5-VL: 1.1 GB), which only
matters at the bottom of the ladder. The safety margin is max(1 GiB, 10% of free memory):
CUDA caching-allocator fragmentation, cuBLAS/cuDNN workspaces, Triton buffers, the estimate's own error.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from pipeline.models.block_offload import all_block_lists, transformer_blocks
from pipeline.quantization.safetensors_file import DTYPES, read_header

GiB = 1024**3
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = (*TEXT_ENCODERS, "vae", "transformer")
DENOISE_FACTOR, TEXT_FACTOR, VAE_FACTOR = 20, 32, 8
PIXELS_PER_TOKEN = 16  # both families: 8x VAE downsampling, 2x2 patches
QWEN_VAE_TILE = 256  # AutoencoderKLQwenImage's default tile (not in its config.json)



def _block_key(name: str) -> Optional[tuple[int, int]]:
    """(block list, block number) of a tensor name in any architecture's block lists (run order), else None."""
    lists = all_block_lists()
    m = re.match(rf"^({'|'.join(map(re.escape, lists))})\.(\d+)\.", name)
    return (lists.index(m.group(1)), int(m.group(2))) if m else None


def _header(path: Path) -> dict[str, Any]:
    """A safetensors file's tensor entries (no tensor is read)."""
    return read_header(path)[0]


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one model folder: those an index lists, else those without a variant infix."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        names = set(json.loads(index[0].read_text())["weight_map"].values())
        return sorted(folder / n for n in names)
    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if "." not in f.name.removesuffix(".safetensors")]
    return plain or files


def tensor_bytes(source: str | Path | nn.Module, dtype: Optional[torch.dtype] = None) -> dict[str, int]:
    """Bytes of each tensor: of a .safetensors file or model folder (headers only), or of a module's state dict.

    With `dtype`, floating tensors count at that dtype's size (what loading with `dtype=` makes of them). A folder
    with only .bin files gives each file's size (no names, so no per-block split).
    """
    if isinstance(source, nn.Module):
        seen, out = set(), {}
        for name, t in source.state_dict().items():
            if t.data_ptr() in seen:
                continue  # tied weights are stored once
            seen.add(t.data_ptr())
            size = dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
            out[name] = t.numel() * size
        return out
    path = Path(source)
    files = [path] if path.is_file() else _weight_files(path)
    if not files:  # pickled weights (.bin) have no header to read: their file sizes, one entry per file
        return {f.name: f.stat().st_size for f in sorted(path.glob("*.bin"))}
    out = {}
    for f in files:
        for name, info in _header(f).items():
            begin, end = info["data_offsets"]
            n = end - begin
            stored = DTYPES.get(info["dtype"])
            if dtype is not None and stored is not None and stored.is_floating_point:
                n = n // stored.itemsize * dtype.itemsize
            out[name] = n
    return out


def component_bytes(source, dtype: Optional[torch.dtype] = None) -> dict[str, int]:
    """Bytes per component (text_encoder, text_encoder_2, vae, transformer) of a diffusers folder (headers) or of
    an in-process pipeline (its modules' parameters and buffers); components that are absent are left out."""
    if isinstance(source, (str, Path)):
        folder = Path(source)
        return {name: sum(tensor_bytes(folder / name, dtype).values())
                for name in COMPONENTS if (folder / name).is_dir()}
    from pipeline.quantization import module_bytes

    return {name: module_bytes(m) for name in COMPONENTS
            if isinstance(m := getattr(source, name, None), nn.Module)}


@dataclass(frozen=True)
class TransformerBytes:
    """A transformer's bytes: in total and per block, in run order (what per-block streaming moves)."""

    total: int
    blocks: tuple[int, ...]

    @property
    def outside_blocks(self) -> int:
        """Embedders, norm_out, proj_out: always on the device when the transformer is."""
        return self.total - sum(self.blocks)

    @classmethod
    def from_tensors(cls, sizes: dict[str, int]) -> "TransformerBytes":
        per_block: dict[tuple[int, int], int] = {}
        for name, n in sizes.items():
            key = _block_key(name)
            if key is not None:
                per_block[key] = per_block.get(key, 0) + n
        return cls(sum(sizes.values()), tuple(per_block[k] for k in sorted(per_block)))


def transformer_bytes(source: str | Path | nn.Module, dtype: Optional[torch.dtype] = None) -> TransformerBytes:
    """Of a weight file (e.g. a Nunchaku svdq-*.safetensors), a transformer folder, or an in-process transformer."""
    if isinstance(source, nn.Module):
        from pipeline.quantization import module_bytes

        return TransformerBytes(module_bytes(source), tuple(module_bytes(b) for b in transformer_blocks(source)))
    return TransformerBytes.from_tensors(tensor_bytes(source, dtype))


@dataclass(frozen=True)
class ModelDims:
    """The widths the activation estimate needs, read from configs (no weights)."""

    transformer_width: int  # attention heads x head dim
    text_widths: tuple[int, ...]  # hidden size of each text encoder
    vae_channels: int  # decoder channels at full resolution
    vae_tile: Optional[int]  # pixel side of one tile with tiling on


def _text_width(cfg: dict[str, Any]) -> int:
    text = cfg.get("text_config") or {}
    return int(text.get("hidden_size") or cfg.get("hidden_size") or cfg["d_model"])


def _vae_dims(cfg: dict[str, Any], tile: Optional[int]) -> tuple[int, Optional[int]]:
    if "base_dim" in cfg:  # AutoencoderKLQwenImage
        return int(cfg["base_dim"]), tile or QWEN_VAE_TILE
    size = cfg.get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(cfg["block_out_channels"][0]), tile or size


def _transformer_width(cfg: dict[str, Any]) -> int:
    """Attention heads x head dim, or the config's `dim` where it gives the width itself (Z-Image's)."""
    if "num_attention_heads" in cfg and "attention_head_dim" in cfg:
        return int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    return int(cfg["dim"])


def model_dims(source, transformer_config: Optional[dict[str, Any]] = None) -> ModelDims:
    """From a diffusers folder's config.json files, or from an in-process pipeline's module configs;
    `transformer_config` stands in for a folder without transformer/config.json (a quantized file's metadata)."""
    if isinstance(source, (str, Path)):
        folder = Path(source)

        def cfg(name):
            return json.loads((folder / name / "config.json").read_text())

        text = [cfg(n) for n in TEXT_ENCODERS if (folder / n / "config.json").is_file()]
        vae_cfg, tile = cfg("vae"), None
        t = transformer_config or cfg("transformer")
    else:
        text = [getattr(source, n).config.to_dict() for n in TEXT_ENCODERS if getattr(source, n, None) is not None]
        vae_cfg = dict(source.vae.config)
        tile = getattr(source.vae, "tile_sample_min_size", None) or getattr(source.vae, "tile_sample_min_height", None)
        t = dict(source.transformer.config)
    channels, tile = _vae_dims(vae_cfg, tile)
    return ModelDims(_transformer_width(t),
                     tuple(_text_width(c) for c in text), channels, tile)


@dataclass(frozen=True)
class Workload:
    """One pipeline call at its largest: the biggest batch and image the run makes."""

    batch_size: int
    height: int
    width: int
    text_tokens: int  # max_sequence_length
    dtype_bytes: int  # 2 for bfloat16/float16, 4 for float32
    extra_tokens: int = 0  # what an edit model's input images add to the transformer's sequence (Family.extra_tokens)


@dataclass(frozen=True)
class MemoryEstimate:
    """Weights per component and activations per phase, in bytes; `need` turns them into a placement's peak."""

    text_encoders: dict[str, int]
    transformer: TransformerBytes
    vae: int
    text_activations: int
    denoise_activations: int
    vae_activations: int

    def need(self, offload: str, blocks_on_gpu: Optional[int] = None, text_on_device: bool = True) -> int:
        """Peak device bytes of a placement (offload none|model|sequential; streaming when blocks_on_gpu is set)."""
        t = self.transformer
        text_act = self.text_activations if text_on_device else 0
        if offload == "model":  # one component at a time (the previous one leaves before the next arrives)
            largest_text = max(self.text_encoders.values(), default=0)
            return max(largest_text + text_act, t.total + self.denoise_activations, self.vae + self.vae_activations)
        if offload == "sequential":  # one leaf module at a time; a leaf is smaller than a block
            return max(t.blocks, default=t.total) + max(text_act, self.denoise_activations, self.vae_activations)
        text = sum(self.text_encoders.values()) if text_on_device else 0
        return text + self.transformer_on_device(blocks_on_gpu) + self.vae + max(
            text_act, self.denoise_activations, self.vae_activations)

    def transformer_on_device(self, blocks_on_gpu: Optional[int]) -> int:
        """All of it, or: outside the blocks + the first N blocks + 2 streamed blocks (current and prefetched)."""
        t = self.transformer
        if blocks_on_gpu is None or blocks_on_gpu >= len(t.blocks):
            return t.total
        return t.outside_blocks + sum(t.blocks[:blocks_on_gpu]) + 2 * max(t.blocks[blocks_on_gpu:])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        t = d.pop("transformer")
        d["transformer"] = {"total": t["total"], "outside_blocks": self.transformer.outside_blocks,
                            "blocks": len(t["blocks"]), "largest_block": max(t["blocks"], default=0)}
        return d


def activation_bytes(dims: ModelDims, work: Workload, vae_tiling: bool) -> tuple[int, int, int]:
    """(text, denoise, vae) working sets in bytes; the formulas and their assumptions are in the module doc."""
    b, a = work.batch_size, work.dtype_bytes
    tokens = (work.height // PIXELS_PER_TOKEN) * (work.width // PIXELS_PER_TOKEN) + work.text_tokens + work.extra_tokens
    denoise = b * tokens * dims.transformer_width * a * DENOISE_FACTOR
    text = b * work.text_tokens * sum(dims.text_widths) * a * TEXT_FACTOR
    h, w, images = work.height, work.width, b
    if vae_tiling:
        images = 1
        if dims.vae_tile:
            h, w = min(h, dims.vae_tile), min(w, dims.vae_tile)
    vae = images * h * w * dims.vae_channels * a * VAE_FACTOR
    return text, denoise, vae


def estimate_memory(components: dict[str, int], transformer: TransformerBytes, dims: ModelDims, work: Workload,
                    vae_tiling: bool = False) -> MemoryEstimate:
    """Combine component bytes (the transformer's come separately: the quantized file's, or the 16-bit weights')
    with the run's activations."""
    text, denoise, vae = activation_bytes(dims, work, vae_tiling)
    return MemoryEstimate({n: components[n] for n in TEXT_ENCODERS if n in components}, transformer,
                          components.get("vae", 0), text, denoise, vae)
