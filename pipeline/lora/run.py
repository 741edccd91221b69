"""A run's LoRAs: every file the run and its rows name, read and checked against the model before anything
loads, then put on the transformer batch by batch (a batch's tasks share one LoRA set: their batch key holds it).

Why one place: reading (files.py) needs the model's module names and shapes, applying (apply.py) the loaded
transformer, and the runner only knows batches. A file for another model family or width, an unknown key (under
lora.strict) or an unreadable file stops the run here, with exit status 2, before the model loads.
Switching sets between batches swaps the low-rank branches (and the reversible 16-bit merges) only. That needs
the transformer's tensors where they are used: with block streaming or sequential offload only the first set can
be applied (before placement), so a run whose rows use several sets refuses those placements.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

from torch import nn

from pipeline.errors import LoraError
from pipeline.lora.spec import LoraRef, lora_set, run_loras

log = logging.getLogger("pipeline")


def _meta_transformer(cfg, info) -> nn.Module:
    """The model's transformer on the meta device (names and shapes, no memory), as LoRA files are checked against."""
    import torch

    from pipeline.models.quantized import meta_transformer, transformer_config

    config, _ = transformer_config(cfg.model, info)
    return meta_transformer(cfg.model.family, config, torch.bfloat16)


def run_refs(cfg) -> tuple[LoraRef, ...]:
    """`model.loras` as references; a missing file is a config error naming the key."""
    from pipeline.errors import ConfigError

    refs = []
    for i, spec in enumerate(cfg.model.loras):
        try:
            refs += run_loras([spec])
        except ValueError as e:
            raise ConfigError([(f"model.loras.{i}.path", str(e))]) from None
    return tuple(refs)


class RunLoras:
    """The LoRA files of a run, read once (sha256 -> LoraWeights), and which set the transformer holds now."""

    def __init__(self, weights: dict[str, Any], sets: list[tuple[LoraRef, ...]]):
        self.weights = weights
        self.sets = sets  # every distinct set the run's tasks use, in first-use order
        self.current: Optional[tuple] = None
        self.report: dict[str, Any] = {}

    @classmethod
    def prepare(cls, cfg, rows: Iterable, info=None) -> "RunLoras":
        """Read every LoRA the run's rows will use (the run's and theirs) against the model's transformer."""
        run = run_refs(cfg)
        sets = list(dict.fromkeys(lora_set(run, getattr(r, "loras", ())) for r in rows))
        refs = {r.sha256: r for s in sets for r in s}
        if not refs:
            return cls({}, sets)
        from pipeline.lora.files import read_lora

        meta = _meta_transformer(cfg, info)
        weights = {}
        for sha, ref in refs.items():
            weights[sha] = read_lora(ref.path, meta, cfg.model.family, strict=cfg.lora.strict)
            ignored = weights[sha].ignored
            log.info("LoRA %s (%s, %s): %d layers%s", ref.name, weights[sha].format, sha[:12],
                     len(weights[sha].layers), f", {len(ignored)} keys ignored" if ignored else "")
        return cls(weights, sets)

    @property
    def used(self) -> bool:
        return bool(self.weights)

    def check_placement(self, placement) -> None:
        """Several LoRA sets swap tensors between batches: not under block streaming or sequential offload."""
        if len(self.sets) <= 1:  # one set for the whole run: applied once, before placement
            return
        if placement.blocks_on_gpu is not None or placement.offload == "sequential":
            raise LoraError(
                f"the rows use {len(self.sets)} different LoRA sets, which are swapped between batches, but the "
                f"transformer is placed with {'block streaming' if placement.blocks_on_gpu is not None else 'sequential offload'} "
                "(tensors the swap cannot reach). Use one LoRA set per run (model.loras), or model.offload=model "
                "or none without model.blocks_on_gpu.")

    def use(self, loras: tuple[LoraRef, ...], *transformers: Optional[nn.Module], reversible: bool = True) -> None:
        """Put `loras` (a task's set) on the transformer(s), replacing the set they hold; nothing if unchanged.
        reversible=False merges for good, keeping no copy of the original weights (the quantize job's bake)."""
        key = tuple(r.key() for r in loras)
        if key == self.current or (not key and not self.current):  # unchanged, or none ever applied
            self.current = key
            return
        from pipeline.lora.apply import apply_loras, remove_loras

        for t in transformers:
            if t is None:
                continue
            if loras:
                report = apply_loras(t, [(self.weights[r.sha256], r.strength) for r in loras], reversible=reversible)
                if report is not None and t is transformers[0]:
                    self.report = report
            else:
                remove_loras(t)
        self.current = key
        if loras:
            log.info("LoRAs: %s", ", ".join(f"{r.name}:{r.strength:g}" for r in loras))

    def to_dict(self) -> dict[str, Any]:
        """run.json's `loras`: each file once (name, path, sha256, format, layers, ignored keys), and the sets."""
        refs = {r.sha256: r for s in self.sets for r in s}
        return {"files": [{**refs[sha].to_dict(), "format": w.format, "made_for": w.family, "layers": len(w.layers),
                           **({"ignored": list(w.ignored)} if w.ignored else {})} for sha, w in self.weights.items()],
                "sets": [[f"{r.name}:{r.strength:g}" for r in s] for s in self.sets],
                **({"first_set": {"modules": len(self.report.get("modules", {})),
                                  "rank_added": self.report.get("rank_added")}} if self.report else {})}
