"""Expand manifest rows into image tasks: effective settings, deterministic seeds, settings hash.

Seeds: an image's seed is the row's `seed` if given, else `sampler.seed + row index`
(`seed_policy=index`, the default) or `sampler.seed` (`seed_policy=fixed`); a row with
`num_images: n` uses seed, seed+1, ..., seed+n-1. The same row gets the same seed in a rerun or a
sweep. The settings hash covers everything that changes the pixels, so resume can tell a finished
image from one made with other settings.

Random seeds: `-1` (as in A1111 and ComfyUI) means "draw one". A row's `seed: -1` draws that row's
first seed; `sampler.seed=-1` draws one base seed for the run, which then goes through the policy
above (index: base + row index; fixed: base). Draws are uniform in 0..2**32-1 (A1111's range), made
by `draw_random_seeds` before expansion and recorded in run.json; a rerun into the same folder passes
the recorded ones back as `previous`, so it reuses them, gets the same settings hashes and file names,
and finds its finished images. Every image whose seed came from a draw has `seed_drawn` set.

Batches and bytes: images that share a pipeline call are computed together, and on CPU (GEMM thread splits)
the batch changes an image's bytes. So batches are always formed over the job's whole task list in manifest
order (`plan_batches`), whatever is already on disk and however many processes share the job: an image's bytes
depend only on its row, the settings and job.batch_size (and the machine: device, dtype, torch version, CPU
thread count). A resumed run regenerates a partly finished batch whole and writes only its missing images; a
data-parallel run gives batch i to rank i % world_size.

Input images (edit and inpainting models): a task carries its row's checked inputs (pipeline/inputs.py). Each
one's role and sha256 enter the settings hash (a changed file is a changed image: resume regenerates it); only
images with the same inputs share a pipeline call; with no height/width set the output takes the first input's
aspect ratio (`size_for_input`). Text rows hash exactly as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional

from pipeline.config.schema import MAX_SIDE, SIZE_MULTIPLE, ModelConfig, ModelSource, RunConfig, SeedPolicy
from pipeline.inputs import InputImage
from pipeline.lora.spec import LoraRef, lora_set, run_loras
from pipeline.manifest import PromptRow
from pipeline.quantization.plan import QuantPlan


@dataclass(frozen=True)
class ImageTask:
    row: PromptRow
    number: int  # 0..num_images-1 within the row
    seed: int
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    true_cfg_scale: float
    height: int
    width: int
    max_sequence_length: int
    settings_hash: str
    seed_drawn: bool = False  # the seed came from a -1 (drawn at random, recorded in run.json's random_seeds)
    images: tuple[InputImage, ...] = ()  # the row's input image(s) (edit models)
    mask: Optional[InputImage] = None  # the row's mask (inpainting models)
    loras: tuple[LoraRef, ...] = ()  # the run's and the row's LoRAs, in canonical order (pipeline/lora/spec.py)

    @property
    def stem(self) -> str:
        return f"{self.row.id}_{self.seed}"

    @property
    def inputs(self) -> tuple[InputImage, ...]:
        """The input images, then the mask."""
        return self.images + ((self.mask,) if self.mask is not None else ())

    @property
    def batch_key(self) -> tuple:
        """Images with equal keys can share one pipeline call (the same input files too)."""
        return (self.steps, self.guidance, self.true_cfg_scale, self.height, self.width, self.max_sequence_length,
                tuple((i.role, i.sha256) for i in self.inputs), self.lora_key)

    @property
    def lora_key(self) -> tuple:
        """The LoRA set, as (sha256, strength) pairs: images with other sets never share a pipeline call."""
        return tuple(r.key() for r in self.loras)

    def params(self) -> dict[str, Any]:
        """What made the image (the sidecar and PNG metadata); `seed_drawn` only where the seed was drawn."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            **({"seed_drawn": True} if self.seed_drawn else {}),
            "steps": self.steps,
            "guidance": self.guidance,
            "true_cfg_scale": self.true_cfg_scale,
            "height": self.height,
            "width": self.width,
            "max_sequence_length": self.max_sequence_length,
            **({"inputs": [{"role": i.role, "path": i.given, "sha256": i.sha256, "width": i.width,
                            "height": i.height} for i in self.inputs]} if self.inputs else {}),
            **({"loras": [r.to_dict() for r in self.loras]} if self.loras else {}),
        }


def model_identity(model: ModelConfig) -> dict[str, Any]:
    """What identifies the weights: for tiny models their architecture and seed, else the path."""
    ident: dict[str, Any] = {"name": model.name, "family": model.family, "source": model.source.value}
    if model.source == ModelSource.tiny:
        from omegaconf import OmegaConf

        ident["tiny"] = OmegaConf.to_container(OmegaConf.structured(model.tiny))
    else:
        ident["path"] = model.path or model.hf_id
        ident["revision"] = model.revision
    return ident


def run_identity(cfg: RunConfig, plan: QuantPlan, dtype: str) -> dict[str, Any]:
    """The run-wide part of every image's settings hash."""
    s = cfg.sampler.scheduler
    quant = {k: getattr(plan, k) for k in ("enabled", "precision", "rank", "act_unsigned", "path")}
    if plan.enabled and not plan.path:  # quantized in-process: the calibration shapes the weights
        from dataclasses import asdict

        quant["calibration"] = asdict(cfg.quantization.calibration)
    return {
        "model": model_identity(cfg.model),
        "quantization": quant,
        "scheduler": {"name": s.name.value, "shift": s.shift, "use_dynamic_shifting": s.use_dynamic_shifting},
        "dtype": dtype,
        "vae_tiling": cfg.model.vae_tiling,  # tiles are decoded apart and blended: other pixels
    }


def _first(*values):
    return next(v for v in values if v is not None)


def size_for_input(input_width: int, input_height: int, area: int, height: Optional[int] = None,
                   width: Optional[int] = None) -> tuple[int, int]:
    """(height, width) of the output of an edit model when the row and the sampler leave some of it unset.

    Neither set: the input's aspect ratio at `area` pixels (the model's recommended height*width), as diffusers'
    Kontext and Qwen-Image-Edit pipelines pick a size. One set: the other follows the input's aspect ratio. Each
    side is rounded to the nearest multiple of SIZE_MULTIPLE (16) and kept in 16..4096; both set: unchanged.
    E.g. a 1200x800 input at 1024*1024: 1248 wide, 832 high; with height=512: 768 wide."""
    ratio = input_width / input_height

    def side(x: float) -> int:
        return min(MAX_SIDE, max(SIZE_MULTIPLE, math.floor(x / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE))

    if height is None and width is None:
        w = math.sqrt(area * ratio)
        return side(w / ratio), side(w)
    if height is None:
        return side(width / ratio), width
    if width is None:
        return height, side(height * ratio)
    return height, width


def _size(row: PromptRow, cfg: RunConfig) -> tuple[int, int]:
    """(height, width): the row's, else the sampler's, else from the first input image, else the model's."""
    s, rec = cfg.sampler, cfg.model.recommended
    height = row.height if row.height is not None else s.height
    width = row.width if row.width is not None else s.width
    if row.images and (height is None or width is None):
        first = row.images[0]
        return size_for_input(first.width, first.height, rec.height * rec.width, height, width)
    return _first(height, rec.height), _first(width, rec.width)


RANDOM_SEED = -1  # "draw one", as in A1111 and ComfyUI
SEED_RANGE = 2**32  # drawn seeds are in 0..2**32-1, as A1111 draws them
# random_seeds' key for a drawn base seed; the others are row ids, which cannot have parentheses
SAMPLER_SEED_KEY = "(sampler.seed)"


def draw_random_seeds(rows: Iterable[PromptRow], sampler_seed: int,
                      previous: Optional[Mapping[str, Any]] = None) -> dict[str, int]:
    """The seeds to use for every `-1`: {row id: first seed} for rows with `seed: -1`, and
    {"(sampler.seed)": base seed} when `sampler_seed` is -1 and some row takes the sampler's seed.

    Seeds found in `previous` (run.json's `random_seeds` from an earlier run into the same folder) are
    reused, so a resumed run makes the same images and finds the finished ones; only missing ones are
    drawn (`secrets.randbelow(2**32)`). Returns only the keys this run needs: record it as is."""
    previous = previous or {}

    def pick(key: str) -> int:
        old = previous.get(key)
        if isinstance(old, int) and not isinstance(old, bool) and 0 <= old < 2**63:
            return old
        return secrets.randbelow(SEED_RANGE)

    seeds: dict[str, int] = {}
    for row in rows:
        if row.seed == RANDOM_SEED:
            seeds[row.id] = pick(row.id)
        elif row.seed is None and sampler_seed == RANDOM_SEED and SAMPLER_SEED_KEY not in seeds:
            seeds[SAMPLER_SEED_KEY] = pick(SAMPLER_SEED_KEY)
    return seeds


def recorded_random_seeds(run_json) -> dict[str, Any]:
    """`random_seeds` of an earlier run's run.json (the `previous` of draw_random_seeds); {} if there is none."""
    from pipeline.outputs.atomic import read_json_object

    seeds = (read_json_object(run_json) or {}).get("random_seeds")
    return dict(seeds) if isinstance(seeds, dict) else {}


def _first_seed(row: PromptRow, cfg: RunConfig, random_seeds: Mapping[str, int]) -> tuple[int, bool]:
    """The row's first seed, and whether it was drawn."""
    s = cfg.sampler
    if row.seed is not None and row.seed != RANDOM_SEED:
        return row.seed, False
    if row.seed == RANDOM_SEED:
        return _drawn(random_seeds, row.id, row), True
    base = _drawn(random_seeds, SAMPLER_SEED_KEY, row) if s.seed == RANDOM_SEED else s.seed
    return (base + row.index if s.seed_policy == SeedPolicy.index else base), s.seed == RANDOM_SEED


def _drawn(random_seeds: Mapping[str, int], key: str, row: PromptRow) -> int:
    if key not in random_seeds:
        raise ValueError(f"row {row.id!r} (line {row.line}): seed -1 but random_seeds has no {key!r}; "
                         "pass expand() what draw_random_seeds(rows, sampler.seed, previous) returned")
    return random_seeds[key]


def expand(rows: Iterable[PromptRow], cfg: RunConfig, identity: dict[str, Any],
           random_seeds: Optional[Mapping[str, int]] = None) -> Iterator[ImageTask]:
    """One task per image. `random_seeds` (from draw_random_seeds) gives the seeds of `-1`s; without it they
    are drawn here, unrecorded: a run that may be resumed passes the mapping it recorded."""
    s, rec = cfg.sampler, cfg.model.recommended
    base = json.dumps(identity, sort_keys=True)
    rows = list(rows)
    if random_seeds is None:
        random_seeds = draw_random_seeds(rows, s.seed)
    run_set = run_loras(cfg.model.loras)
    for row in rows:
        first_seed, drawn = _first_seed(row, cfg, random_seeds)
        height, width = _size(row, cfg)
        inputs = row.images + ((row.mask,) if row.mask is not None else ())
        hashed_inputs = {"inputs": [{"role": i.role, "sha256": i.sha256} for i in inputs]} if inputs else {}
        loras = lora_set(run_set, row.loras)
        if loras:  # text rows without LoRAs hash as before
            hashed_inputs["loras"] = [list(r.key()) for r in loras]
        for k in range(row.num_images):
            settings = dict(
                prompt=row.prompt,
                negative_prompt=_first(row.negative_prompt, s.negative_prompt),
                seed=first_seed + k,
                steps=_first(row.steps, s.steps, rec.steps),
                guidance=_first(row.guidance, s.guidance, rec.guidance),
                true_cfg_scale=_first(row.true_cfg_scale, s.true_cfg_scale, rec.true_cfg_scale),
                height=height,
                width=width,
                max_sequence_length=_first(s.max_sequence_length, rec.max_sequence_length),
            )
            hashed = json.dumps({**settings, **hashed_inputs}, sort_keys=True)  # text rows: as before the inputs
            digest = hashlib.sha256((base + hashed).encode()).hexdigest()[:16]
            yield ImageTask(row=row, number=k, settings_hash=digest, seed_drawn=drawn, images=row.images,
                            mask=row.mask, loras=loras, **settings)


def batches(tasks: list[ImageTask], batch_size: int) -> Iterator[list[ImageTask]]:
    """Group tasks with equal settings, in manifest order of first appearance, into batches.

    Pass the job's WHOLE task list (finished images included), never only the pending ones: see
    `plan_batches`. Which images share a pipeline call changes their bytes on CPU (and can on GPU)."""
    groups: dict[tuple, list[ImageTask]] = {}
    for t in tasks:
        groups.setdefault(t.batch_key, []).append(t)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]


@dataclass(frozen=True)
class Batch:
    """One pipeline call of the job: `number` is its place in the job's batch order (what decides the rank that
    makes it in a data-parallel run), `todo[i]` whether `tasks[i]` is to be written (False: already on disk)."""

    number: int
    tasks: tuple[ImageTask, ...]
    todo: tuple[bool, ...]

    @property
    def pending(self) -> list[ImageTask]:
        return [t for t, w in zip(self.tasks, self.todo) if w]


def plan_batches(tasks: list[ImageTask], batch_size: int, pending: Iterable[ImageTask],
                 rank: int = 0, world_size: int = 1) -> list[Batch]:
    """The batches to run: formed over ALL `tasks` in manifest order, as a clean one-process run forms them, so an
    image's bytes depend only on its row, the settings and job.batch_size, never on what was already on disk or on
    how many processes share the job. Only batches with at least one `pending` image are returned (a partly
    finished batch is made whole again and only its pending images are written), and of those only the ones
    this rank owns: batch number i (counted over all batches, finished ones included) belongs to rank
    i % world_size."""
    wanted = {id(t) for t in pending}
    out = []
    for number, batch in enumerate(batches(tasks, batch_size)):
        todo = tuple(id(t) in wanted for t in batch)
        if any(todo) and number % world_size == rank:
            out.append(Batch(number, tuple(batch), todo))
    return out
