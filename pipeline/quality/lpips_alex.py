"""LPIPS with the AlexNet backbone, without torchvision.

torchmetrics' LPIPS builds its backbone from torchvision.models.alexnet, and torchvision does not load beside the
CPU torch of this environment. This is the same network (the AlexNet `features` layers that LPIPS taps after each
ReLU, the input scaling layer, unit-normalised feature differences, 1x1 linear layers, spatial mean), loading:

* the backbone from a torchvision AlexNet state dict (`alexnet-owt-7be5be79.pth`, keys `features.N.weight`), or from
  a full LPIPS state dict (`net.sliceK.N.weight`, as torchmetrics' `_LPIPS.state_dict()` saves it);
* the linear layers (`lin0.model.1.weight` .. `lin4.model.1.weight`) from the same file(s) if present, else from the
  `lpips_models/alex.pth` file that ships inside the torchmetrics package (local; nothing is downloaded).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

CHANNELS = (64, 192, 384, 256, 256)
# torchvision AlexNet.features indices after which LPIPS taps (relu1..relu5): slices [0,2) [2,5) [5,8) [8,10) [10,12)
SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))
_SLICE_KEY = re.compile(r"^(?:module\.)?net\.slice[1-5]\.(\d+)\.(weight|bias)$")
_FEATURE_KEY = re.compile(r"^(?:module\.)?(?:features\.)(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"^(?:module\.)?(lin[0-4])\.model\.\d+\.weight$")


def _features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=False),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=False),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=False),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=False),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=False),
    )


def bundled_linear_weights() -> Path:
    """The LPIPS linear-layer file shipped inside torchmetrics (v0.1 'alex')."""
    import torchmetrics.functional.image.lpips as tm_lpips

    return Path(tm_lpips.__file__).resolve().parent / "lpips_models" / "alex.pth"


def weight_files(path: Path) -> list[Path]:
    """The state-dict files behind `path`: the file itself, or every *.pth/*.pt in the folder."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".pth", ".pt") and p.is_file())
    return [path]


class AlexLPIPS(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = _features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)

    @classmethod
    def from_path(cls, path: Path) -> "AlexLPIPS":
        """Load from a file or folder (see the module docstring); ValueError says what is missing."""
        state: dict[str, torch.Tensor] = {}
        for f in weight_files(path):
            loaded = torch.load(f, map_location="cpu", weights_only=True)
            if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
                loaded = loaded["state_dict"]
            if not isinstance(loaded, dict):
                raise ValueError(f"{f}: not a state dict (got {type(loaded).__name__})")
            state.update(loaded)
        feats, lins = {}, {}
        for key, value in state.items():
            if m := _FEATURE_KEY.match(key) or _SLICE_KEY.match(key):
                feats[f"{m.group(1)}.{m.group(2)}"] = value
            elif m := _LIN_KEY.match(key):
                lins[f"{int(m.group(1)[3:])}.weight"] = value
        if not lins:
            bundled = torch.load(bundled_linear_weights(), map_location="cpu", weights_only=True)
            lins = {f"{int(_LIN_KEY.match(k).group(1)[3:])}.weight": v for k, v in bundled.items() if _LIN_KEY.match(k)}
        model = cls()
        want = {k for k in model.features.state_dict()}
        missing = sorted(want - set(feats))
        if missing:
            raise ValueError(f"{path}: no AlexNet backbone weights (missing {', '.join('features.' + k for k in missing[:4])}"
                             f"{' ...' if len(missing) > 4 else ''}); expected torchvision's alexnet-owt-7be5be79.pth "
                             f"or an LPIPS state dict with net.slice1..5 keys")
        model.features.load_state_dict({k: feats[k] for k in want})
        if len(lins) != len(CHANNELS):
            raise ValueError(f"{path}: LPIPS linear weights incomplete (found {sorted(lins)})")
        model.lins.load_state_dict(lins)
        return model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: (N, 3, H, W) in [0, 1]. Returns (N,) LPIPS distances."""
        a = ((2 * a - 1) - self.shift) / self.scale
        b = ((2 * b - 1) - self.shift) / self.scale
        total = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
        for (start, stop), lin in zip(SLICES, self.lins):
            for i in range(start, stop):
                a, b = self.features[i](a), self.features[i](b)
            na = a / torch.sqrt(1e-8 + (a ** 2).sum(dim=1, keepdim=True))
            nb = b / torch.sqrt(1e-8 + (b ** 2).sum(dim=1, keepdim=True))
            total = total + lin((na - nb) ** 2).mean(dim=(1, 2, 3))
        return total
