"""The typed shape of a run's configuration, registered with Hydra's ConfigStore.

Why: Hydra merges every YAML file and command-line override into these dataclasses, so a typo
(`sampler.stpes`) or a wrong type (`sampler.steps=four`) fails at composition, naming the key.
Value ranges that types cannot express are checked by `check()` methods, all at once, before any
model is built (see `pipeline.config.validate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING

# Both FLUX and Qwen-Image use an 8x VAE and 2x2 patches: image sides must be multiples of 16.
SIZE_MULTIPLE = 16
MAX_SIDE = 4096


class ModelSource(str, Enum):
    tiny = "tiny"  # built in-process from a config, seeded random weights
    pretrained = "pretrained"  # a local diffusers folder or an HF id already in the local cache


class QuantMode(str, Enum):
    none = "none"
    auto = "auto"
    manual = "manual"


class Precision(str, Enum):
    int4 = "int4"
    nvfp4 = "nvfp4"


class Backend(str, Enum):
    auto = "auto"  # the real Nunchaku engine where it is installed and supports the GPU, else native
    native = "native"  # this project's engine (PyTorch reference on CPU; kernels where built)
    nunchaku = "nunchaku"  # the real engine only; an error where it is missing or is the wrong package


class OnTheFly(str, Enum):
    never = "never"
    tiny = "tiny"  # quantize in-process when there is no file, for the tiny models only
    always = "always"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    auto = "auto"  # bfloat16 on CUDA, float32 on CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Offload(str, Enum):
    """Where the pipeline's weights live while it runs (see pipeline/models/placement.py)."""

    none = "none"  # every component on the device (the transformer may still stream blocks: model.blocks_on_gpu)
    model = "model"  # diffusers' model CPU offload: one whole component on the device at a time
    sequential = "sequential"  # diffusers' sequential CPU offload: one leaf module at a time (least memory, slowest)
    auto = "auto"  # the least offload that fits the device's free memory, estimated before loading


class TextEncoderDevice(str, Enum):
    auto = "auto"  # offload=auto decides; otherwise the sampler's device
    cpu = "cpu"  # encode prompts on the CPU (the embeddings then move to the device)
    sampler = "sampler"  # the same device as sampler.device


class SeedPolicy(str, Enum):
    index = "index"  # base seed + row index (a row's own seed wins)
    fixed = "fixed"  # the base seed for every row (a row's own seed wins)


class OnError(str, Enum):
    abort = "abort"
    skip = "skip"


class SchedulerName(str, Enum):
    default = "default"  # whatever the model ships with
    flow_match_euler = "flow_match_euler"


Problem = tuple[str, str]  # (dotted key, what is wrong and how to fix it)


@dataclass
class TinySpec:
    """Sizes of the in-process toy model; the architecture is the real one."""

    num_layers: int = 2
    num_single_layers: int = 2  # FLUX only
    num_attention_heads: int = 2
    attention_head_dim: int = 64
    text_hidden_size: int = 64
    text_layers: int = 2
    vocab_size: int = 400
    guidance_embeds: bool = False
    sample_size: int = 128
    seed: int = 0  # weights seed: same seed, same model, bit for bit


@dataclass
class ModelDefaults:
    """What the model wants when the sampler leaves a value unset (null)."""

    steps: int = 28
    guidance: float = 3.5
    true_cfg_scale: float = 1.0
    height: int = 1024
    width: int = 1024
    max_sequence_length: int = 512
    min_steps: int = 1  # Qwen-Image's scheduler (shift_terminal) gives a NaN timestep for 1 step


@dataclass
class LoraSpec:
    """One LoRA for the whole run (model.loras): a file (diffusers/PEFT, kohya, ai-toolkit, BFL/ComfyUI, XLabs,
    Qwen-Image community formats) and its strength."""

    path: str = MISSING
    strength: float = 1.0


@dataclass
class ModelConfig:
    name: str = MISSING
    family: str = MISSING  # a registered family (pipeline/families/); a string: OmegaConf matches enum names
    source: ModelSource = MISSING
    # pretrained: a local folder with model_index.json, or an HF repo id found in the local cache
    path: Optional[str] = None
    hf_id: Optional[str] = None  # canonical repo id, for messages and for the cache lookup
    revision: Optional[str] = None
    license_url: Optional[str] = None
    tiny: TinySpec = field(default_factory=TinySpec)
    recommended: ModelDefaults = field(default_factory=ModelDefaults)
    # Memory placement (pipeline/models/placement.py). auto: on a GPU, the least offload that fits its free
    # memory (run.json records the choice and why); on the CPU, nothing to offload.
    offload: Offload = Offload.auto
    blocks_on_gpu: Optional[int] = None  # transformer blocks kept on the device, the rest stream; null: all
    pin_memory: bool = False  # page-locked CPU copies of streamed blocks: copies overlap compute, pins RAM
    vae_tiling: bool = False  # VAE decodes tile by tile and image by image (tiling can change pixels slightly)
    text_encoder_device: TextEncoderDevice = TextEncoderDevice.auto
    loras: list[LoraSpec] = field(default_factory=list)  # LoRAs for every image (rows may add their own)

    def check(self) -> list[Problem]:
        problems: list[Problem] = self.check_placement()
        for i, lora in enumerate(self.loras):
            if not -10 <= lora.strength <= 10:
                problems.append((f"model.loras.{i}.strength", f"must be in -10..10, got {lora.strength}"))
        from pipeline.families import names

        if self.family not in names():
            problems.append(("model.family", f"must be one of {', '.join(names())}; got {self.family!r}"))
        if self.source == ModelSource.pretrained and not (self.path or self.hf_id):
            problems.append(("model.path", "a pretrained model needs model.path=/local/folder or an HF id"))
        t = self.tiny
        if t.attention_head_dim % 4:
            problems.append(("model.tiny.attention_head_dim", f"must be a multiple of 4, got {t.attention_head_dim}"))
        for key in ("num_layers", "num_attention_heads", "text_layers"):
            if getattr(t, key) < 1:
                problems.append((f"model.tiny.{key}", f"must be >= 1, got {getattr(t, key)}"))
        return problems

    def check_placement(self) -> list[Problem]:
        """Placement settings that contradict each other; each message says which one to change."""
        problems: list[Problem] = []
        diffusers_offload = self.offload in (Offload.model, Offload.sequential)
        if self.blocks_on_gpu is not None:
            if self.blocks_on_gpu < 1:
                problems.append(("model.blocks_on_gpu", "must be >= 1 (blocks kept on the device; the others stream "
                                                        f"from the CPU) or null for all, got {self.blocks_on_gpu}"))
            elif self.offload == Offload.auto:
                problems.append(("model.blocks_on_gpu", "model.offload=auto picks the number of blocks itself; "
                                                        "leave model.blocks_on_gpu=null, or set model.offload=none "
                                                        "to choose it"))
            elif diffusers_offload:
                problems.append(("model.blocks_on_gpu", f"cannot stream blocks under model.offload="
                                                        f"{self.offload.value}, which moves the transformer itself; "
                                                        "set model.offload=none, or model.blocks_on_gpu=null"))
        if self.pin_memory and self.blocks_on_gpu is None and self.offload != Offload.auto:
            problems.append(("model.pin_memory", "pins the CPU copies of streamed transformer blocks, so it needs "
                                                 "model.blocks_on_gpu=N (or model.offload=auto); set it false"))
        if self.text_encoder_device == TextEncoderDevice.cpu and diffusers_offload:
            problems.append(("model.text_encoder_device", f"cpu cannot be combined with model.offload="
                                                          f"{self.offload.value}, which moves the text encoders to "
                                                          "the device for each prompt; set "
                                                          "model.text_encoder_device=auto, or model.offload=none"))
        return problems


@dataclass
class CalibrationConfig:
    """How the quantizer sees activations: prompts run through the 16-bit pipeline, all timesteps hooked."""

    manifest: str = "jobs/calibration.txt"
    num_prompts: int = 8
    steps: int = 4
    height: Optional[int] = None  # null: the model's recommended size
    width: Optional[int] = None
    batch_size: int = 4
    max_rows: int = 512  # token rows per layer kept to measure its output error
    seed: int = 0
    alphas: list[float] = field(default_factory=lambda: [round(a * 0.1, 1) for a in range(11)])

    def check(self) -> list[Problem]:
        problems = check_generation_values("quantization.calibration", steps=self.steps, height=self.height,
                                           width=self.width, seed=self.seed)
        if self.seed == -1:
            problems.append(("quantization.calibration.seed", "must be fixed (>= 0): a quantized file should be "
                                                               "reproducible"))
        for key in ("num_prompts", "batch_size", "max_rows"):
            if getattr(self, key) < 1:
                problems.append((f"quantization.calibration.{key}", f"must be >= 1, got {getattr(self, key)}"))
        if not self.alphas or any(not 0 <= a <= 1 for a in self.alphas):
            problems.append(("quantization.calibration.alphas", f"must be a non-empty list in 0..1, got {self.alphas}"))
        return problems


@dataclass
class QuantizationConfig:
    """SVDQuant settings. `mode` says who decides: nobody (none), the weight file (auto), you (manual)."""

    mode: QuantMode = QuantMode.auto
    path: Optional[str] = None  # a Nunchaku-format svdq-{precision}_r{rank}-*.safetensors file
    enable: Optional[bool] = None
    precision: Optional[Precision] = None
    rank: Optional[int] = None
    act_unsigned: Optional[bool] = None
    preset: Optional[str] = None  # name of the preset that filled these values, for metadata
    force: bool = False  # settings that disagree with the file: warn and use the file, instead of failing
    strict: bool = False  # fail instead of emulating when the GPU lacks the kernels' hardware
    backend: Backend = Backend.auto
    on_the_fly: OnTheFly = OnTheFly.tiny  # auto mode without a file: quantize in-process?
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    output: Optional[str] = None  # quantize job: folder for the svdq-*.safetensors file (null: run dir)
    naming: Optional[str] = None  # quantize job: tensor names, legacy (FLUX only) | diffusers; null: legacy for FLUX

    def check(self) -> list[Problem]:
        problems: list[Problem] = self.calibration.check()
        if self.naming not in (None, "diffusers", "legacy"):
            problems.append(("quantization.naming", f"must be legacy, diffusers or null, got {self.naming!r}"))
        if self.rank is not None and (self.rank < 0 or self.rank % 16):
            problems.append(
                ("quantization.rank", f"must be a non-negative multiple of 16 (e.g. 32 or 128), got {self.rank}")
            )
        if self.act_unsigned and self.precision == Precision.nvfp4:
            problems.append(("quantization.act_unsigned", "unsigned activations exist only for int4; set it false"))
        if self.mode == QuantMode.none and self.enable:
            problems.append(("quantization.enable", "quantization=none cannot be enabled; use quantization=manual"))
        return problems


@dataclass
class SchedulerConfig:
    name: SchedulerName = SchedulerName.default
    shift: Optional[float] = None  # flow-matching timestep shift; null keeps the model's
    use_dynamic_shifting: Optional[bool] = None

    def check(self) -> list[Problem]:
        if self.shift is not None and self.shift <= 0:
            return [("sampler.scheduler.shift", f"must be > 0, got {self.shift}")]
        return []


@dataclass
class SamplerConfig:
    """Generation settings; null means the model's default (model.recommended)."""

    name: str = "default"
    steps: Optional[int] = None
    guidance: Optional[float] = None  # FLUX: distilled guidance; Qwen-Image: guidance-distilled only
    true_cfg_scale: Optional[float] = None  # real classifier-free guidance with the negative prompt
    height: Optional[int] = None
    width: Optional[int] = None
    negative_prompt: str = ""
    seed: int = 0
    seed_policy: SeedPolicy = SeedPolicy.index
    max_sequence_length: Optional[int] = None
    dtype: DType = DType.auto
    device: Device = Device.auto
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def check(self) -> list[Problem]:
        problems = check_generation_values(
            "sampler",
            steps=self.steps,
            guidance=self.guidance,
            true_cfg_scale=self.true_cfg_scale,
            height=self.height,
            width=self.width,
            seed=self.seed,
        )
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= 1024:
            problems.append(("sampler.max_sequence_length", f"must be in 1..1024, got {self.max_sequence_length}"))
        return problems + self.scheduler.check()


@dataclass
class ColumnsConfig:
    """Which manifest column/field holds what, when the file's own names are not recognised (null: detect)."""

    prompt: Optional[str] = None
    id: Optional[str] = None
    negative_prompt: Optional[str] = None
    image: Optional[str] = None  # an edit model's input image(s)
    mask: Optional[str] = None  # an inpainting model's mask


@dataclass
class JobConfig:
    """Which manifest to run and how to write its outputs."""

    name: str = "job"
    manifest: str = MISSING
    batch_size: int = 4
    limit: Optional[int] = None  # only the first N rows
    on_error: OnError = OnError.abort
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    allow_empty: bool = False  # a run that plans no image exits 0 instead of 3
    overwrite: bool = False  # replace finished images made with other settings (else the run refuses)
    wait_for_lock: float = 0.0  # seconds to wait for another run holding the output folder (0: refuse; inf: wait)
    output_dir: Optional[str] = None  # null: Hydra's run dir (outputs/<date>/<time>)
    grid: bool = True
    grid_max_images: int = 64
    png_metadata: bool = True
    progress: str = "auto"  # auto | rich | plain | none
    compare_to_unquantized: bool = False  # also render each image 16-bit and report PSNR

    def check(self) -> list[Problem]:
        problems: list[Problem] = []
        if not 1 <= self.batch_size <= 256:
            problems.append(("job.batch_size", f"must be in 1..256, got {self.batch_size}"))
        if self.limit is not None and self.limit < 1:
            problems.append(("job.limit", f"must be >= 1 or null, got {self.limit}"))
        if self.grid_max_images < 1:
            problems.append(("job.grid_max_images", f"must be >= 1, got {self.grid_max_images}"))
        if self.progress not in ("auto", "rich", "plain", "none"):
            problems.append(("job.progress", f"must be one of auto, rich, plain, none; got {self.progress!r}"))
        if not self.wait_for_lock >= 0:
            problems.append(("job.wait_for_lock", f"must be >= 0 seconds (inf: wait forever), got {self.wait_for_lock}"))
        return problems


@dataclass
class ReportConfig:
    """The quality report (python -m pipeline.report DIR): what the images are compared against, and with what.

    Metrics that need weights read them from local paths only (nothing is downloaded); null: skipped, said so."""

    enabled: bool = False  # write the report at the end of a sweep
    reference: Optional[str] = None  # a reference run folder; null: the sweep's quantization=none job
    worst_k: int = 8  # prompts shown first: where quantization hurts most
    thumbnail: int = 256  # thumbnail side in pixels
    lpips_weights: Optional[str] = None  # LPIPS AlexNet: a folder or file with the alexnet + lpips linear weights
    inception_weights: Optional[str] = None  # FID: the Inception (pt_inception-2015-12-05) weights file
    fid_reference: Optional[str] = None  # FID: a folder of reference images (null: the 16-bit images)
    clip_model: Optional[str] = None  # CLIP score: a local CLIP folder (transformers format)
    image_reward: bool = False  # ImageReward, if the package and its weights are installed

    def check(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.worst_k < 1:
            problems.append(("report.worst_k", f"must be >= 1, got {self.worst_k}"))
        if not 32 <= self.thumbnail <= 2048:
            problems.append(("report.thumbnail", f"must be in 32..2048, got {self.thumbnail}"))
        return problems


@dataclass
class LoraSettings:
    """How LoRA files are read (pipeline/lora/)."""

    strict: bool = True  # a LoRA key that matches no layer is an error; false: skipped, listed in run.json


@dataclass
class QuantizeSettings:
    """The quantize job's own settings (svdq-quantize)."""

    bake_loras: bool = False  # merge model.loras into the 16-bit weights before calibrating and quantizing


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    quantization: QuantizationConfig = MISSING
    sampler: SamplerConfig = MISSING
    job: JobConfig = MISSING
    report: ReportConfig = field(default_factory=ReportConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    quantize: QuantizeSettings = field(default_factory=QuantizeSettings)

    def check(self) -> list[Problem]:
        problems = (self.model.check() + self.quantization.check() + self.sampler.check() + self.job.check()
                    + self.report.check())
        least = self.model.recommended.min_steps
        for key, steps in (("sampler.steps", self.sampler.steps),
                           ("quantization.calibration.steps", self.quantization.calibration.steps)):
            if steps is not None and steps < least:
                problems.append((key, f"{self.model.name} needs at least {least} steps (its scheduler gives NaN "
                                      f"timesteps below that), got {steps}"))
        return problems


def check_generation_values(prefix: str, **values: Any) -> list[Problem]:
    """Range checks shared by the sampler config and manifest rows (which override it)."""
    problems: list[Problem] = []
    if prefix:
        prefix += "."
    steps = values.get("steps")
    if steps is not None and not 1 <= steps <= 1000:
        problems.append((f"{prefix}steps", f"must be in 1..1000, got {steps}"))
    for key in ("guidance", "true_cfg_scale"):
        v = values.get(key)
        if v is not None and not 0 <= v <= 100:
            problems.append((f"{prefix}{key}", f"must be in 0..100, got {v}"))
    for key in ("height", "width"):
        v = values.get(key)
        if v is not None and (v % SIZE_MULTIPLE or not SIZE_MULTIPLE <= v <= MAX_SIDE):
            lower = max(SIZE_MULTIPLE, v // SIZE_MULTIPLE * SIZE_MULTIPLE)
            problems.append(
                (
                    f"{prefix}{key}",
                    f"must be a multiple of {SIZE_MULTIPLE} in {SIZE_MULTIPLE}..{MAX_SIDE}, got {v}"
                    f" (nearest allowed: {lower} or {lower + SIZE_MULTIPLE})",
                )
            )
    seed = values.get("seed")
    if seed is not None and not -1 <= seed < 2**63:
        problems.append((f"{prefix}seed", f"must be in 0..2**63-1, or -1 for a random seed, got {seed}"))
    return problems


def register_configs() -> None:
    """Make the schema known to Hydra: `conf/config.yaml` lists `run_schema` first in its defaults."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
