"""Read a safetensors file tensor by tensor with plain reads, not a memory map.

Why: safetensors' own reader maps the file, so every page a load touches stays mapped into the process: loading
a 7 GB file that way shows 14 GB resident (the mapped file plus the tensors made from it). Reading each tensor
straight into its own buffer keeps the process at the tensors it holds; the file's pages stay in the page cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """(tensor entries, metadata, offset of the data) from the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + n


class TensorFile:
    """The tensors of one safetensors file, each read on request into a fresh tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries, self.metadata, self.data_start = read_header(self.path)
        end = max((e["data_offsets"][1] for e in self.entries.values()), default=0)
        size = self.path.stat().st_size
        if size < self.data_start + end:
            raise ValueError(f"the file has {size} bytes but its header describes {self.data_start + end}: truncated")
        self._file = open(self.path, "rb")
        self._staging = torch.empty(0, dtype=torch.uint8)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get_tensor(self, name: str, staged: bool = False) -> torch.Tensor:
        """The tensor, in a buffer of its own; `staged`: in a buffer reused by the next staged read, for a tensor
        the caller converts at once (the packed weights): fresh memory costs page faults, a reused one does not."""
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        if staged:
            if self._staging.numel() < end - begin:
                self._staging = torch.empty(end - begin, dtype=torch.uint8)
            buffer = self._staging[: end - begin]
        else:
            buffer = torch.empty(end - begin, dtype=torch.uint8)
        self._file.seek(self.data_start + begin)
        if end > begin and self._file.readinto(memoryview(buffer.numpy())) != end - begin:
            raise ValueError(f"{self.path}: tensor {name} is cut short (truncated file?)")
        return buffer.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def close(self) -> None:
        self._file.close()
        self._staging = torch.empty(0, dtype=torch.uint8)

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
