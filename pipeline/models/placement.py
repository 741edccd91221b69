"""Memory placement: where a run's weights live, so 4-bit FLUX.1 (12B) or Qwen-Image (20B) fit a 12-24 GB GPU.

Why: the text encoders (T5-XXL 9.5 GB, Qwen2.5-VL 16.6 GB) often outweigh the 4-bit transformer, and the VAE
decode of a batch can need more than the transformer's weights. From the estimate pipeline/models/memory.py makes
before anything is loaded, this module
  (b) picks a placement (`choose_placement`): for offload=auto the least offload that fits the free memory, in
      the order: everything on the device -> diffusers' model offload -> text encoders on the CPU -> per-block
      streaming of the transformer with the largest N that fits (text encoders on the CPU) -> diffusers'
      sequential offload. Model offload comes before encoders on the CPU: it moves each component over PCIe once
      per batch (about a second for FLUX.1), while T5-XXL or Qwen2.5-VL-7B encode a prompt in 16 bits on the CPU
      in several seconds;
  (c) applies it to a pipeline (`apply_placement`), with diffusers' own offload where it does the job;
  (d) swaps in another transformer (the 16-bit reference) without two transformers on the device
      (`swapped_transformer`).
On the CPU every offload is a no-op; the Placement says so and one log line names the ignored settings.
The safety margin is max(1 GiB, 10% of free memory): CUDA caching-allocator fragmentation, cuBLAS/cuDNN
workspaces, Triton buffers, the estimate's own error.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from pipeline.config.schema import ModelConfig, Offload, TextEncoderDevice
from pipeline.models.block_offload import stream_blocks, streamer_of
from pipeline.models.build import quiet_diffusers
from pipeline.models.memory import GiB, TEXT_ENCODERS, MemoryEstimate, TransformerBytes, transformer_bytes

log = logging.getLogger("pipeline")

MARGIN_FLOOR, MARGIN_SHARE = 1 * GiB, 0.10
FreeMemory = Callable[[], tuple[int, int]]  # () -> (free, total) bytes, as torch.cuda.mem_get_info

# ---------------------------------------------------------------- (b) the decision


def safety_margin(free: int) -> int:
    return max(MARGIN_FLOOR, int(free * MARGIN_SHARE))


@dataclass
class Placement:
    """Where the weights go, and why; `to_dict()` is what run.json records."""

    offload: str  # none | model | sequential (what runs; never auto)
    blocks_on_gpu: Optional[int]  # transformer blocks kept on the device while the others stream; None: all
    pin_memory: bool
    vae_tiling: bool
    text_encoder_device: str  # cpu, or the run device
    device: str
    reason: str
    fits: Optional[bool] = None  # None: not estimated (the CPU, or no estimate given)
    need_bytes: Optional[int] = None
    free_bytes: Optional[int] = None
    margin_bytes: Optional[int] = None
    requested: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # settings that have no effect here
    estimate: Optional[MemoryEstimate] = None

    @property
    def streams_blocks(self) -> bool:
        return self.blocks_on_gpu is not None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "estimate"}
        d["estimate"] = self.estimate.to_dict() if self.estimate is not None else None
        return d


def _requested(model: ModelConfig) -> dict[str, Any]:
    return {"offload": model.offload.value, "blocks_on_gpu": model.blocks_on_gpu, "pin_memory": model.pin_memory,
            "vae_tiling": model.vae_tiling, "text_encoder_device": model.text_encoder_device.value}


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _cpu_placement(model: ModelConfig, device: torch.device, estimate: Optional[MemoryEstimate]) -> Placement:
    ignored = [f"model.offload={model.offload.value}"] if model.offload in (Offload.model, Offload.sequential) else []
    if model.blocks_on_gpu is not None:
        ignored.append(f"model.blocks_on_gpu={model.blocks_on_gpu}")
    if model.pin_memory:
        ignored.append("model.pin_memory=true")
    reason = "the run device is the CPU: every weight is already in RAM, so there is nothing to offload"
    if ignored:
        reason += f" ({', '.join(ignored)} has no effect)"
    return Placement("none", None, False, model.vae_tiling, "cpu", str(device), reason, requested=_requested(model),
                     ignored=ignored, estimate=estimate)


def _candidates(te: TextEncoderDevice) -> list[tuple[str, bool]]:
    """auto's ladder as (step, text encoders on the device), least offload first, filtered by the user's choice."""
    ladder = [("none", True), ("model", True), ("none", False), ("blocks", False), ("sequential", True)]
    if te == TextEncoderDevice.cpu:
        return [c for c in ladder if c in (("none", False), ("blocks", False))]
    if te == TextEncoderDevice.sampler:
        return [("none", True), ("model", True), ("blocks", True), ("sequential", True)]
    return ladder


def largest_blocks_that_fit(estimate: MemoryEstimate, budget: int, text_on_device: bool) -> Optional[int]:
    """The most resident blocks (fewer than all) whose streaming placement fits `budget`, or None."""
    for n in range(len(estimate.transformer.blocks) - 1, 0, -1):
        if estimate.need("none", n, text_on_device) <= budget:
            return n
    return None


def choose_placement(model: ModelConfig, estimate: Optional[MemoryEstimate], device: torch.device,
                     free_memory: Optional[FreeMemory] = None) -> Placement:
    """The placement for `model`'s settings on `device`; auto tries the ladder against the free memory.

    `free_memory` returns (free, total) bytes; default torch.cuda.mem_get_info(device) (tests pass a fake).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return _cpu_placement(model, device, estimate)
    if model.offload == Offload.auto and estimate is None:
        raise ValueError("model.offload=auto needs a MemoryEstimate to choose from")
    free, _ = free_memory() if free_memory else torch.cuda.mem_get_info(device)
    margin = safety_margin(free)
    budget = free - margin
    common = dict(vae_tiling=model.vae_tiling, device=str(device),
                  free_bytes=free, margin_bytes=margin, requested=_requested(model), estimate=estimate)
    where = f"free {_gib(free)} - margin {_gib(margin)} = {_gib(budget)} to fill"
    if model.offload != Offload.auto:
        offload = model.offload.value
        text_on_device = model.text_encoder_device != TextEncoderDevice.cpu
        blocks = model.blocks_on_gpu
        reason = f"requested model.offload={offload}" + (f", blocks_on_gpu={blocks}" if blocks else "")
        if blocks is not None and estimate is not None and blocks >= len(estimate.transformer.blocks):
            reason += f" (the transformer has {len(estimate.transformer.blocks)} blocks: all stay on the device)"
            blocks = None
        need = estimate.need(offload, blocks, text_on_device) if estimate is not None else None
        fits = None if need is None else need <= budget
        if need is not None:
            reason += f"; needs about {_gib(need)} of {where}" + ("" if fits else
                                                                 " - may not fit: try model.offload=auto")
        return Placement(offload, blocks, model.pin_memory and blocks is not None,
                         text_encoder_device="cpu" if not text_on_device else str(device),
                         reason=reason, fits=fits, need_bytes=need, **common)
    tried = []
    chosen = None
    for step, text_on_device in _candidates(model.text_encoder_device):
        blocks = largest_blocks_that_fit(estimate, budget, text_on_device) if step == "blocks" else None
        offload = "none" if step == "blocks" else step
        need = estimate.need(offload, blocks, text_on_device) if step != "blocks" or blocks else None
        label = _step_label(step, text_on_device, blocks)
        if need is not None and need <= budget:
            chosen = (offload, blocks, text_on_device, need, True)
            break
        tried.append(label + (f" ({_gib(need)})" if need is not None else " (not even 1 block)"))
    if chosen is None:  # nothing fits: the last step, with the fewest blocks if it streams
        tried.pop()
        step, text_on_device = _candidates(model.text_encoder_device)[-1]
        blocks = 1 if step == "blocks" else None
        offload = "none" if step == "blocks" else step
        chosen = (offload, blocks, text_on_device, estimate.need(offload, blocks, text_on_device), False)
    offload, blocks, text_on_device, need, fits = chosen
    label = _step_label("blocks" if blocks else offload, text_on_device, blocks)
    reason = f"auto: {label} needs about {_gib(need)} of {where}"
    if tried:
        reason += f"; less offload does not fit: {', '.join(tried)}"
    if not fits:
        reason += "; nothing fits - lower job.batch_size or the image size, or set model.vae_tiling=true"
    return Placement(offload, blocks, model.pin_memory and blocks is not None,
                     text_encoder_device=str(device) if text_on_device else "cpu",
                     reason=reason, fits=fits, need_bytes=need, **common)


def _step_label(step: str, text_on_device: bool, blocks: Optional[int]) -> str:
    if step == "blocks":
        where = "" if text_on_device else ", text encoders on the CPU"
        return f"per-block offload ({blocks} blocks on the device{where})" if blocks else "per-block offload"
    if step == "none":
        return "everything on the device" if text_on_device else "text encoders on the CPU"
    return f"diffusers' {step} CPU offload"


# ---------------------------------------------------------------- (c) applying it


def run_on_cpu(module: nn.Module) -> list:
    """Hooks that run `module` on the CPU whatever device its inputs come from, and hand its outputs back there.

    Why: QwenImagePipeline moves the tokens to its execution device before calling the text encoder (FluxPipeline
    asks the encoder's device itself); with this, both work with the encoders on the CPU. Logits and the KV cache,
    which no pipeline here reads, stay on the CPU. Returns the handles (`.remove()` undoes it).
    """
    from accelerate.utils import find_device, send_to_device

    cpu = torch.device("cpu")
    came_from: list[Optional[torch.device]] = []

    def before(mod, args, kwargs):
        came_from.append(find_device((args, kwargs)))
        return send_to_device(args, cpu), send_to_device(kwargs, cpu)

    def after(mod, args, kwargs, output):
        device = came_from.pop() if came_from else None
        if device is None or device == cpu:
            return output
        return send_to_device(output, device, skip_keys=("logits", "past_key_values"))

    return [module.register_forward_pre_hook(before, with_kwargs=True),
            module.register_forward_hook(after, with_kwargs=True)]


def apply_placement(pipe, placement: Placement, device: torch.device,
                    dtype: Optional[torch.dtype] = None) -> None:
    """Put `pipe`'s components where `placement` says (casting to `dtype` when given, as pipe.to would).

    Pass dtype=None once the transformer is quantized: its layers keep their own dtypes (an fp32 bias).
    Call it once, on a pipeline whose components are on the CPU; undo diffusers' offload with
    pipe.remove_all_hooks() and streaming with streamer_of(pipe.transformer).remove().
    """
    device = torch.device(device)
    if placement.ignored or device.type == "cuda":
        log.info("placement: %s", placement.reason)  # one line per run, not per component or batch
    with quiet_diffusers():
        if placement.offload in ("model", "sequential"):
            if dtype is not None:
                pipe.to(dtype=dtype)
            _enable_diffusers_offload(pipe, placement.offload, device)
        elif device.type != "cuda" or not (placement.streams_blocks or placement.text_encoder_device == "cpu"):
            pipe.to(device=device, dtype=dtype)
        else:
            cpu = torch.device("cpu")
            for name, module in pipe.components.items():
                if not isinstance(module, nn.Module) or name == "transformer":
                    continue
                on_cpu = name in TEXT_ENCODERS and placement.text_encoder_device == "cpu"
                module.to(device=cpu if on_cpu else device, dtype=dtype)
                if on_cpu:
                    run_on_cpu(module)
            if placement.streams_blocks:
                stream_blocks(pipe.transformer, device, placement.blocks_on_gpu, placement.pin_memory, dtype)
            else:
                pipe.transformer.to(device=device, dtype=dtype)
    if placement.vae_tiling:
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()


def _enable_diffusers_offload(pipe, offload: str, device: torch.device) -> None:
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)


# ---------------------------------------------------------------- (d) the reference transformer


def _park(transformer: nn.Module) -> None:
    """Move a transformer off the device (a streamed one keeps its hooks and CPU copies for `_unpark`)."""
    streamer = streamer_of(transformer)
    if streamer is not None:
        streamer.park()
    else:
        transformer.to(device=torch.device("cpu"))


def _unpark(transformer: nn.Module, device: torch.device) -> None:
    streamer = streamer_of(transformer)
    if streamer is not None:
        streamer.unpark()
    else:
        transformer.to(device=device)


def _swap_activations(base: Placement) -> int:
    """The largest working set the reference pass adds, from the run's estimate (0 without one)."""
    est = base.estimate
    if est is None:
        return 0
    text = est.text_activations if base.text_encoder_device != "cpu" else 0
    return max(text, est.denoise_activations, est.vae_activations)


def reference_placement(other: TransformerBytes, base: Placement, free: int) -> Placement:
    """How the reference transformer goes on the device next to what `base` left there: whole if it fits, else
    streamed with the most blocks that fit (1 when none do)."""
    margin = safety_margin(free)
    budget = free - margin
    swap_est = MemoryEstimate({}, other, 0, 0, _swap_activations(base), 0)
    blocks = None if swap_est.need("none") <= budget else (largest_blocks_that_fit(swap_est, budget, False) or 1)
    need = swap_est.need("none", blocks)
    what = "whole" if blocks is None else f"streamed, {blocks} blocks on the device"
    return replace(base, offload="none", blocks_on_gpu=blocks, pin_memory=False, fits=need <= budget,
                   need_bytes=need, free_bytes=free, margin_bytes=margin, estimate=swap_est,
                   reason=f"reference transformer {what}: needs about {_gib(need)} of free {_gib(free)} - margin "
                          f"{_gib(margin)} after the run's transformer left the device")


def _free(device: torch.device, free_memory: Optional[FreeMemory]) -> Optional[int]:
    """Free device bytes now (after returning cached blocks), or None on the CPU without a fake."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return (free_memory or (lambda: torch.cuda.mem_get_info(device)))()[0]
    return free_memory()[0] if free_memory else None


@contextmanager
def swapped_transformer(pipe, other: nn.Module, placement: Placement, device: torch.device,
                        free_memory: Optional[FreeMemory] = None) -> Iterator[Placement]:
    """Run the body with `other` (kept on the CPU, e.g. the 16-bit reference) as pipe.transformer, never with two
    transformers on the device: the current one leaves first, `other` comes in whole or streamed per block (or
    under diffusers' offload: model offload when it fits alone, else sequential), and everything is restored
    afterwards. Yields `other`'s placement (for run.json).

    `free_memory` as in choose_placement; on the CPU, without it, nothing is measured and the two only swap places.
    """
    device = torch.device(device)
    current = pipe.transformer
    if placement.offload in ("model", "sequential"):
        yield from _swapped_under_diffusers_offload(pipe, other, placement, device, free_memory)
        return
    _park(current)
    free = _free(device, free_memory)
    if free is None:
        ref = replace(placement, reason="the run device is the CPU: the transformers only swap places")
    else:
        ref = reference_placement(transformer_bytes(other), placement, free)
    if ref.streams_blocks:
        stream_blocks(other, device, ref.blocks_on_gpu)
    else:
        other.to(device=device)
    pipe.transformer = other
    try:
        yield ref
    finally:
        streamer = streamer_of(other)
        if streamer is not None:
            streamer.remove()
        else:
            other.to(device=torch.device("cpu"))
        _free(device, None)
        pipe.transformer = current
        _unpark(current, device)


def _swapped_under_diffusers_offload(pipe, other, placement: Placement, device: torch.device,
                                     free_memory: Optional[FreeMemory]):
    current, mode = pipe.transformer, placement.offload
    with quiet_diffusers():
        pipe.remove_all_hooks()
        pipe.to(device=torch.device("cpu"))
        pipe.transformer = other
        free = _free(device, free_memory)
        alone = MemoryEstimate({}, transformer_bytes(other), 0, 0, _swap_activations(placement), 0).need("none")
        if mode == "model" and free is not None and alone > free - safety_margin(free):
            mode = "sequential"  # model offload would hold the whole reference transformer at once
        _enable_diffusers_offload(pipe, mode, device)
    try:
        yield replace(placement, offload=mode, reason=f"reference transformer under diffusers' {mode} CPU offload")
    finally:
        with quiet_diffusers():
            pipe.remove_all_hooks()
            pipe.to(device=torch.device("cpu"))
            pipe.transformer = current
            _enable_diffusers_offload(pipe, placement.offload, device)
