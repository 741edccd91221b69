"""One generated image on disk: `<stem>.png` with its parameters embedded, plus `<stem>.json`.

The PNG carries an A1111-style `parameters` text chunk (shown by common image tools and UIs) and a
`svdq-batch` chunk with the full JSON; neither holds a timestamp, so same settings, same bytes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Optional

from PIL import Image, PngImagePlugin

from pipeline.outputs.atomic import atomic_write_bytes, atomic_write_json

PNG_JSON_KEY = "svdq-batch"


def a1111_parameters(params: dict[str, Any]) -> str:
    """The `parameters` text that AUTOMATIC1111, ComfyUI loaders and exif tools display."""
    from pipeline.lora.spec import prompt_tags

    lines = [params["prompt"] + prompt_tags(params.get("loras") or [])]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    q = params.get("quantization") or {}
    quant = f"SVDQuant {q['precision']} r{q['rank']}" if q.get("enabled") else "16-bit"
    fields = [
        ("Steps", params["steps"]),
        ("Sampler", params.get("scheduler", "FlowMatchEuler")),
        ("CFG scale", params.get("true_cfg_scale")),
        ("Guidance", params.get("guidance")),
        ("Seed", params["seed"]),
        ("Size", f"{params['width']}x{params['height']}"),
        ("Model", params["model"]),
        ("Quantization", quant),
        ("Lora hashes", '"' + ", ".join(f"{d['name']}: {d['sha256'][:12]}" for d in params["loras"]) + '"'
         if params.get("loras") else None),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def png_bytes(image: Image.Image, params: Optional[dict[str, Any]]) -> bytes:
    info = None
    if params is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", a1111_parameters(params))
        info.add_text(PNG_JSON_KEY, json.dumps(params, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_image(folder: Path, stem: str, image: Image.Image, params: dict[str, Any], sidecar: dict[str, Any], embed: bool = True) -> Path:
    """PNG first, then the sidecar: a sidecar's presence means its PNG is complete."""
    png = folder / f"{stem}.png"
    atomic_write_bytes(png, png_bytes(image, params if embed else None))
    atomic_write_json(folder / f"{stem}.json", sidecar)
    return png


def read_sidecar(folder: Path, stem: str) -> Optional[dict[str, Any]]:
    """The sidecar of a finished image, or None if the pair is incomplete or unreadable."""
    png, side = folder / f"{stem}.png", folder / f"{stem}.json"
    if not (png.is_file() and side.is_file()):
        return None
    try:
        return json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_png_params(path: Path) -> dict[str, Any]:
    with Image.open(path) as im:
        return json.loads(im.text[PNG_JSON_KEY])
