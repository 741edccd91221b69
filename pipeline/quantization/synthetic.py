"""A full-size svdq-* file that costs no disk: the real tensor layout, the large tensors left as holes.

Why: no real weights are at hand here, yet loading has to be proven at full model size (every name, shape and
dtype the loader expects; peak memory while loading 7-12 GB). A sparse file has the real size and layout; its
holes read back as zeros, which are valid 4-bit codes, scales and low-rank weights. Small tensors are written:
the smoothing factors, q/k norm weights and NVFP4 tensor/channel scales as ones (a zero smoothing factor would
divide by zero), everything else as zeros.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from pipeline.quantization.safetensors_file import DTYPES

_NAMES = {dtype: name for name, dtype in DTYPES.items()}  # torch dtype -> safetensors' dtype name
ONES = (".smooth_factor", ".smooth_factor_orig", ".smooth", ".smooth_orig", ".wtscale", ".wcscales", "norm_q.weight",
        "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")
SMALL_BYTES = 1 << 20  # tensors up to this size are written; larger ones are holes


def write_sparse_checkpoint(path: str | Path, layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
                            metadata: Optional[dict[str, str]] = None, small_bytes: int = SMALL_BYTES) -> int:
    """Write `layout` (name -> (shape, dtype)) as a safetensors file whose large tensors are holes; returns its size."""
    names = sorted(layout)
    header: dict[str, object] = {}
    offset = 0
    for name in names:
        shape, dtype = layout[name]
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name in names:
            begin, end = header[name]["data_offsets"]
            if end - begin <= small_bytes:
                shape, dtype = layout[name]
                fill = torch.ones if name.endswith(ONES) else torch.zeros
                f.seek(start + begin)
                f.write(fill(shape, dtype=dtype).reshape(-1).view(torch.uint8).numpy().tobytes())
        f.truncate(start + offset)
    return start + offset
