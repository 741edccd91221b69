"""Per-block streaming of a transformer: N blocks stay on the device, the others visit it as they run.

Why: a 4-bit FLUX.1 or Qwen-Image transformer (7-12 GB) or its 16-bit reference (24-41 GB) need not be on a
12-24 GB GPU all at once. As Nunchaku's per-block offload does, the first `resident` blocks and every module
outside the block lists (embedders, norm_out, proj_out) stay on the device; the other blocks live in CPU memory
(page-locked with `pin_memory`) and are copied in just before they run, the next one on a side CUDA stream while
the current one computes, and dropped right after. At most `resident` + 2 blocks are on the device.

Not diffusers' group offloading: that also moves the non-block modules every forward, has no resident blocks,
and pins every tensor up front. Copies are plain tensor copies, so outputs are bit-identical to the resident
model. With the CPU as the "device" the same logic runs as synchronous copies (fresh CPU tensors), which is what
the CPU tests exercise.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
from torch import nn


_STREAMERS: "weakref.WeakKeyDictionary[nn.Module, BlockStreamer]" = weakref.WeakKeyDictionary()


def block_lists(transformer: nn.Module) -> tuple[str, ...]:
    """The names of the transformer's block lists in the order they run (its architecture's `block_stacks`,
    e.g. FLUX's double then single blocks)."""
    from pipeline.quantization.architecture import architecture_of

    try:
        return tuple(architecture_of(transformer).block_stacks)
    except ValueError:  # another transformer: whichever known block-list names it has
        return tuple(name for name in all_block_lists() if hasattr(transformer, name))


def all_block_lists() -> tuple[str, ...]:
    """Every architecture's block lists, each architecture's in run order (for files read without a model)."""
    from pipeline.quantization.architecture import architectures

    return tuple(dict.fromkeys(name for arch in architectures() for name in arch.block_stacks))


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's blocks in the order they run."""
    return [block for name in block_lists(transformer) for block in getattr(transformer, name, None) or []]


def non_block_modules(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's direct children other than the block lists: these stay on the device."""
    lists = block_lists(transformer)
    return [child for name, child in transformer.named_children() if name not in lists]


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """What Module.to(dtype) does to one tensor: only floating tensors change dtype."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


class _StreamedBlock:
    """One block's tensors and their CPU copies; `load` puts copies on the device, `drop` points back at the CPU."""

    def __init__(self, block: nn.Module, dtype: Optional[torch.dtype], pin: bool):
        block.to(device=torch.device("cpu"), dtype=dtype)  # Module.to: quantized layers keep their dtypes
        # Unique tensors: fused layers share input-side buffers (one tensor object in several modules), and
        # setting `.data` once keeps them shared.
        self.tensors = list({id(t): t for t in [*block.parameters(), *block.buffers()]}.values())
        self.host = [t.data.pin_memory() if pin else t.data for t in self.tensors]
        for t, host in zip(self.tensors, self.host):
            t.data = host
        self.ready: Optional[torch.cuda.Event] = None  # set when the copy was issued on the side stream

    def load(self, device: torch.device, stream) -> None:
        """Copy to the device: on `stream` when given (returns at once), else synchronously."""
        if stream is None:
            for t, host in zip(self.tensors, self.host):
                t.data = host.to(device, copy=True)
            return
        with torch.cuda.stream(stream):
            for t, host in zip(self.tensors, self.host):
                t.data = host.to(device, non_blocking=True, copy=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def wait(self, device: torch.device) -> None:
        """Make the compute stream wait for a side-stream copy, and tell the allocator it uses those tensors."""
        if self.ready is None:
            return
        current = torch.cuda.current_stream(device)
        current.wait_event(self.ready)
        for t in self.tensors:
            t.data.record_stream(current)
        self.ready = None

    def drop(self) -> None:
        for t, host in zip(self.tensors, self.host):
            t.data = host
        self.ready = None

    def on_device(self) -> bool:
        """True when the block's tensors are device copies, not its CPU copies (checked on the tensors)."""
        return any(t.data_ptr() != host.data_ptr() for t, host in zip(self.tensors, self.host))


class BlockStreamer:
    """Hooks on every block of a transformer that keep `resident` blocks on `device` and stream the rest.

    `loads` counts block copies to the device; `remove()` takes the hooks off and leaves every block on one device.
    """

    def __init__(self, transformer: nn.Module, device: torch.device, resident: int, pin_memory: bool = False,
                 dtype: Optional[torch.dtype] = None):
        blocks = transformer_blocks(transformer)
        if not blocks:
            raise ValueError(f"{type(transformer).__name__} has no {' or '.join(all_block_lists())} to stream")
        if resident < 1:
            raise ValueError(f"resident must be >= 1, got {resident}")
        if transformer in _STREAMERS:
            raise ValueError("this transformer already streams its blocks; remove() that streamer first")
        self.transformer = transformer
        self.device = torch.device(device)
        self.blocks: Sequence[nn.Module] = blocks
        self.resident = min(resident, len(blocks))
        on_cuda = self.device.type == "cuda"
        self.pin_memory = pin_memory and on_cuda  # pinning needs CUDA; on the CPU there is nothing to overlap
        self.stream = torch.cuda.Stream(self.device) if on_cuda else None
        self.loads = 0
        self._move_resident(self.device, dtype)
        self._streamed = {i: _StreamedBlock(b, dtype, self.pin_memory) for i, b in enumerate(blocks)
                          if i >= self.resident}
        self._prefetched: Optional[int] = None
        self._handles = []
        for i, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(self._before(i)))
            if i in self._streamed:
                self._handles.append(block.register_forward_hook(self._after(i)))
        _STREAMERS[transformer] = self

    def _move_resident(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> None:
        """The modules outside the blocks, the resident blocks and the transformer's own tensors (if any)."""
        for module in [*non_block_modules(self.transformer), *self.blocks[: self.resident]]:
            module.to(device=device, dtype=dtype)
        for name in ("_parameters", "_buffers"):
            for t in getattr(self.transformer, name).values():
                if t is not None:
                    t.data = _cast(t.data, dtype).to(device)

    def park(self) -> None:
        """Leave the device entirely (e.g. while another transformer runs), keeping the hooks and CPU copies."""
        if self.stream is not None:
            self.stream.synchronize()
        for block in self._streamed.values():
            block.drop()
        self._prefetched = None
        self._move_resident(torch.device("cpu"))

    def unpark(self) -> None:
        """Back to the state after construction: the resident part on the device, streamed blocks on the CPU."""
        self._move_resident(self.device)

    @property
    def streamed(self) -> int:
        return len(self._streamed)

    def on_device(self) -> list[int]:
        """Indices of the blocks whose weights are on the device now (resident ones always are)."""
        return list(range(self.resident)) + [i for i, b in self._streamed.items() if b.on_device()]

    def _next_streamed(self, i: int) -> Optional[int]:
        return next((j for j in range(i + 1, len(self.blocks)) if j in self._streamed), None)

    def _before(self, i: int):
        def hook(module, args):
            block = self._streamed.get(i)
            if block is not None:
                if self._prefetched == i:
                    block.wait(self.device)
                    self._prefetched = None
                elif not block.on_device():  # not prefetched (first block after the resident ones, or out of order)
                    block.load(self.device, None)
                    self.loads += 1
            self._prefetch(self._next_streamed(i))
            return None

        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            self._streamed[i].drop()
            return None

        return hook

    def _prefetch(self, j: Optional[int]) -> None:
        """Start copying block j, dropping an earlier prefetch that never ran, so at most one waits on the device."""
        if j is None or j == self._prefetched:
            return
        if self._prefetched is not None:
            self._streamed[self._prefetched].drop()
            self._prefetched = None
        block = self._streamed[j]
        if block.on_device():
            return
        block.load(self.device, self.stream)  # synchronous without a side stream: ready when `_before(j)` runs
        self.loads += 1
        self._prefetched = j

    def remove(self, device: Optional[torch.device] = None) -> None:
        """Take the hooks off and put the whole transformer on `device` (default: the CPU, i.e. parked)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.stream is not None:
            self.stream.synchronize()
        for block in self._streamed.values():
            block.drop()
        self._streamed.clear()
        self._prefetched = None
        _STREAMERS.pop(self.transformer, None)
        self.transformer.to(device=torch.device("cpu") if device is None else device)


def stream_blocks(transformer: nn.Module, device: torch.device, resident: int, pin_memory: bool = False,
                  dtype: Optional[torch.dtype] = None) -> BlockStreamer:
    """Put `transformer` on `device` with only `resident` blocks kept there; the rest stream as they run."""
    return BlockStreamer(transformer, device, resident, pin_memory, dtype)


def streamer_of(transformer: nn.Module) -> Optional[BlockStreamer]:
    """The streamer attached to `transformer`, if any."""
    return _STREAMERS.get(transformer)
