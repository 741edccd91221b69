"""A contact sheet of a run's images, labelled with their file stems."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from pipeline.outputs.atomic import atomic_write_bytes
from pipeline.outputs.images import png_bytes

THUMB = 192
LABEL_H = 14


def write_grid(paths: list[Path], out: Path, max_images: int = 64) -> Path | None:
    paths = paths[:max_images]
    if not paths:
        return None
    cols = min(len(paths), max(1, math.ceil(math.sqrt(len(paths)))))
    rows = math.ceil(len(paths) / cols)
    sheet = Image.new("RGB", (cols * THUMB, rows * (THUMB + LABEL_H)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            x, y = (i % cols) * THUMB, (i // cols) * (THUMB + LABEL_H)
            sheet.paste(im, (x + (THUMB - im.width) // 2, y + (THUMB - im.height) // 2))
            draw.text((x + 2, y + THUMB + 1), p.stem[:30], fill="black")
    atomic_write_bytes(out, png_bytes(sheet, None))
    return out
