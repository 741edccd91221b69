"""Quality metrics between a reference image (16-bit model) and a quantized model's image.

`pair_metrics` needs no weights (PSNR in closed form; SSIM, MS-SSIM via torchmetrics' functional API; all on RGB
float64 in [0, 1], data_range 1.0). `Metrics` adds the metrics that need weights, each only from a local path in `report.*`:

=============  ==========================  ====================================================================
metric         key                         needs
=============  ==========================  ====================================================================
lpips          report.lpips_weights        AlexNet backbone state dict (torchvision alexnet-owt-7be5be79.pth)
                                           or an LPIPS state dict; linear layers from the same file/folder or
                                           torchmetrics' bundled lpips_models/alex.pth. No torchvision needed.
fid            report.inception_weights    pt_inception-2015-12-05-6726825d.pth + the torch-fidelity package
clip_score     report.clip_model           a local CLIP folder in transformers format (config, weights, tokenizer)
image_reward   report.image_reward: true   the image-reward package + ~/.cache/ImageReward/{ImageReward.pt,
                                           med_config.json} (and bert-base-uncased in the HF cache)
=============  ==========================  ====================================================================

A key that is null: the metric is skipped and `Metrics.skipped[name]` says how to enable it. A path that is set but
does not exist: `MetricUnavailable` at construction. Nothing is ever downloaded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.errors import PipelineError

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, torchmetrics' default
MS_SSIM_KERNEL = 11

LPIPS_NEEDS = ("LPIPS needs the AlexNet LPIPS weights (torchmetrics/lpips 'alex': torchvision's "
               "alexnet-owt-7be5be79.pth backbone, with the linear layers from torchmetrics' bundled "
               "lpips_models/alex.pth); download them on a machine with internet and point report.lpips_weights "
               "at the file (or a folder holding it)")
FID_NEEDS = ("FID needs the FID Inception weights file pt_inception-2015-12-05-6726825d.pth (torch-fidelity's "
             "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
             "weights-inception-2015-12-05-6726825d.pth); download it on a machine with internet and point "
             "report.inception_weights at the file")
CLIP_NEEDS = ("CLIP score needs a local CLIP model folder in transformers format (config.json, weights, tokenizer and "
              "preprocessor files), e.g. openai/clip-vit-large-patch14 saved with save_pretrained or "
              "`huggingface-cli download` on a machine with internet; point report.clip_model at the folder")
IMAGE_REWARD_FILES = ("ImageReward.pt", "med_config.json")


class MetricUnavailable(PipelineError):
    """A metric was configured with a path that does not exist (or cannot be used)."""


# ---------------------------------------------------------------------------------------------- weight-free metrics

def _to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) float64 in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def ms_ssim_settings(height: int, width: int) -> Optional[tuple[tuple[float, ...], int]]:
    """(betas, kernel_size) used for MS-SSIM on an image of this size; None when no setting fits.

    torchmetrics needs min(H, W) >= 2**scales and min(H, W) // (scales - 1)**2 > kernel - 1. The standard 5 scales
    with an 11-px Gaussian kernel (sigma 1.5) fit from 176 px. Below that, the coarsest scales are dropped (4 scales
    from 99 px, e.g. 128x128; 3 from 44 px, e.g. 64x64; 2 from 11 px) and the remaining betas are rescaled to sum
    to 1, so values stay on the same 0..1 scale; below 11 px, 2 scales with the largest odd kernel that fits (>= 3).
    Values from different settings are not strictly comparable; the report should compare like sizes.
    """
    side = min(height, width)
    for n in (5, 4, 3, 2):
        if side >= 2 ** n and side // max(1, n - 1) ** 2 > MS_SSIM_KERNEL - 1:
            betas = MS_SSIM_BETAS[:n]
            total = sum(betas)
            return tuple(b / total for b in betas), MS_SSIM_KERNEL
    for kernel in (9, 7, 5, 3):
        if side >= 4 and side > kernel - 1:
            betas = MS_SSIM_BETAS[:2]
            return tuple(b / sum(betas) for b in betas), kernel
    return None


def psnr(reference: Image.Image, image: Image.Image) -> float:
    """PSNR in dB of two 8-bit RGB images (inf when identical), in float64: 10 log10(255^2 / MSE)."""
    x, y = (np.asarray(i.convert("RGB"), dtype=np.float64) for i in (reference, image))
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def pair_metrics(reference: Image.Image, image: Image.Image) -> dict[str, Optional[float]]:
    """PSNR (dB, inf when identical), SSIM and MS-SSIM of `image` against `reference` (RGB, data_range 1.0).

    SSIM: Gaussian kernel 11, sigma 1.5. MS-SSIM: see `ms_ssim_settings` (5 scales from 176 px; fewer scales with
    renormalised betas on smaller images, e.g. 4 on 128x128, 3 on 64x64); None only for images under 4 px.
    Raises ValueError when the sizes differ.
    """
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure, \
        structural_similarity_index_measure

    if reference.size != image.size:
        raise ValueError(f"images differ in size: reference is {reference.size[0]}x{reference.size[1]}, "
                         f"image is {image.size[0]}x{image.size[1]} (width x height)")
    ref, img = _to_tensor(reference), _to_tensor(image)
    # what torchmetrics' peak_signal_noise_ratio computes, but in float64 throughout (its float32 data_range costs
    # ~1e-6 dB)
    value = psnr(reference, image)
    ssim = float(structural_similarity_index_measure(img, ref, data_range=1.0))
    settings = ms_ssim_settings(ref.shape[-2], ref.shape[-1])
    ms_ssim: Optional[float] = None
    if settings is not None:
        betas, kernel = settings
        ms_ssim = float(multiscale_structural_similarity_index_measure(
            img, ref, data_range=1.0, betas=betas, kernel_size=kernel))
    return {"psnr": value, "ssim": ssim, "ms_ssim": ms_ssim}


# ------------------------------------------------------------------------------------------- metrics with weights

def _missing(key: str, path: str, needs: str) -> MetricUnavailable:
    return MetricUnavailable(f"report.{key}={path}: no such file. {needs}")


def _not_configured(key: str, example: str, needs: str) -> str:
    return f"not configured: set report.{key}={example} ({needs})"


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


class Metrics:
    """The report's metrics; those whose weights are not configured are skipped, with the reason in `skipped`."""

    def __init__(self, report_cfg) -> None:
        self.skipped: dict[str, str] = {}
        self._lpips = None
        self._clip = None
        self._reward = None
        cfg = report_cfg

        lp = getattr(cfg, "lpips_weights", None)
        if lp is None:
            self.skipped["lpips"] = _not_configured("lpips_weights", "/path/to/alexnet-owt-7be5be79.pth", LPIPS_NEEDS)
        elif not Path(lp).expanduser().exists():
            raise _missing("lpips_weights", lp, LPIPS_NEEDS)
        else:
            from pipeline.quality.lpips_alex import AlexLPIPS

            try:
                self._lpips = AlexLPIPS.from_path(Path(lp).expanduser())
            except (ValueError, RuntimeError, OSError) as exc:
                raise MetricUnavailable(f"report.lpips_weights={lp}: cannot be used: {exc}. {LPIPS_NEEDS}") from exc

        iw = getattr(cfg, "inception_weights", None)
        self._inception_path = None
        if iw is None:
            self.skipped["fid"] = _not_configured("inception_weights", "/path/to/pt_inception-2015-12-05-6726825d.pth",
                                                  FID_NEEDS)
        elif not Path(iw).expanduser().is_file():
            raise MetricUnavailable(f"report.inception_weights={iw}: no such file. {FID_NEEDS}")
        else:
            try:
                import torch_fidelity  # noqa: F401
            except ImportError:
                self.skipped["fid"] = ("the torch-fidelity package is not installed (torchmetrics' FID uses its "
                                       "Inception network): pip install torch-fidelity")
            else:
                self._inception_path = str(Path(iw).expanduser())

        cm = getattr(cfg, "clip_model", None)
        self._clip_path = None
        if cm is None:
            self.skipped["clip_score"] = _not_configured("clip_model", "/path/to/clip-vit-large-patch14", CLIP_NEEDS)
        elif not Path(cm).expanduser().is_dir():
            raise MetricUnavailable(f"report.clip_model={cm}: no such folder. {CLIP_NEEDS}")
        else:
            self._clip_path = str(Path(cm).expanduser())

        self._reward_root = None
        if not getattr(cfg, "image_reward", False):
            self.skipped["image_reward"] = ("not configured: set report.image_reward=true (needs the image-reward "
                                            "package and its weights in ~/.cache/ImageReward)")
        else:
            try:
                import ImageReward  # noqa: F401
            except ImportError:
                self.skipped["image_reward"] = "the image-reward package is not installed: pip install image-reward"
            else:
                root = Path("~/.cache/ImageReward").expanduser()
                absent = [name for name in IMAGE_REWARD_FILES if not (root / name).is_file()]
                if absent:
                    self.skipped["image_reward"] = (
                        f"{', '.join(str(root / n) for n in absent)} not found (we never download): fetch "
                        f"ImageReward.pt and med_config.json from the THUDM/ImageReward Hugging Face repo on a "
                        f"machine with internet and put them in {root}")
                else:
                    self._reward_root = root

    # -- per pair
    def pair(self, reference: Image.Image, image: Image.Image) -> dict[str, Optional[float]]:
        """pair_metrics, plus "lpips" (AlexNet; lower is closer) when report.lpips_weights is set."""
        out = pair_metrics(reference, image)
        if self._lpips is not None:
            a = _to_tensor(reference).float()
            b = _to_tensor(image).float()
            out["lpips"] = float(self._lpips(a, b)[0])
        return out

    # -- FID
    def fid(self, reference_images: Sequence[Path], images: Sequence[Path]) -> Optional[float]:
        """FID (2048-d pool features) between two image sets; None when unavailable (reason in `skipped["fid"]`)."""
        if self._inception_path is None:
            return None
        if len(reference_images) < 2 or len(images) < 2:
            self.skipped["fid"] = (f"FID needs at least 2 images per side, got {len(reference_images)} reference "
                                   f"and {len(images)} images")
            return None
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=self._inception_path)
        for real, paths in ((True, reference_images), (False, images)):
            for start in range(0, len(paths), 16):
                batch = [torch.from_numpy(np.asarray(_load_rgb(Path(p)), dtype=np.uint8)).permute(2, 0, 1)
                         for p in paths[start:start + 16]]
                sizes = {tuple(t.shape) for t in batch}
                if len(sizes) > 1:  # the Inception net resizes to 299 anyway; stack needs one size
                    batch = [torch.nn.functional.interpolate(t[None].float(), size=(299, 299), mode="bilinear",
                                                             align_corners=False)[0].round().clamp(0, 255)
                             .to(torch.uint8) for t in batch]
                fid.update(torch.stack(batch), real=real)
        return float(fid.compute())

    # -- CLIP score
    def clip_score(self, images: Sequence[Path], prompts: Sequence[str]) -> Optional[float]:
        """Mean CLIP score max(100 * cos(image, prompt), 0) over the images; None when not configured."""
        if self._clip_path is None:
            return None
        if len(images) != len(prompts):
            raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts")
        if not images:
            return None
        if self._clip is None:
            from transformers import CLIPModel, CLIPProcessor

            try:
                model = CLIPModel.from_pretrained(self._clip_path, local_files_only=True).eval()
                processor = CLIPProcessor.from_pretrained(self._clip_path, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise MetricUnavailable(f"report.clip_model={self._clip_path}: cannot be loaded: {exc}. "
                                        f"{CLIP_NEEDS}") from exc
            self._clip = (model, processor)
        model, processor = self._clip
        scores = []
        with torch.no_grad():
            for start in range(0, len(images), 16):
                pics = [_load_rgb(Path(p)) for p in images[start:start + 16]]
                inputs = processor(text=list(prompts[start:start + 16]), images=pics, return_tensors="pt",
                                   padding=True, truncation=True)
                img = model.get_image_features(pixel_values=inputs["pixel_values"])
                txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
                img = img / img.norm(p=2, dim=-1, keepdim=True)
                txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
                scores.append((100 * (img * txt).sum(dim=-1)).clamp(min=0))
        return float(torch.cat(scores).mean())

    # -- ImageReward
    def image_reward(self, images: Sequence[Path], prompts: Sequence[str]) -> Optional[float]:
        """Mean ImageReward score over (image, prompt) pairs; None when unavailable (reason in `skipped`)."""
        if self._reward_root is None:
            return None
        if len(images) != len(prompts):
            raise ValueError(f"image_reward: {len(images)} images but {len(prompts)} prompts")
        if not images:
            return None
        if self._reward is None:
            import ImageReward as RM

            try:
                self._reward = RM.load(str(self._reward_root / "ImageReward.pt"), device="cpu",
                                       med_config=str(self._reward_root / "med_config.json"))
            except Exception as exc:  # the package reaches for bert-base-uncased etc.; say why and skip
                self.skipped["image_reward"] = f"ImageReward could not be loaded offline: {exc}"
                self._reward_root = None
                return None
        with torch.no_grad():
            values = [float(self._reward.score(prompt, str(path))) for path, prompt in zip(images, prompts)]
        return sum(values) / len(values)
