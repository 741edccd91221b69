"""A contact sheet of a run's images, labelled with their file stems; for edit and inpainting runs each image
follows its input image(s) and mask, so input and output are seen side by side."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw

from pipeline.outputs.atomic import atomic_write_bytes
from pipeline.outputs.images import png_bytes

THUMB = 192
LABEL_H = 14


def write_grid(paths: list[Path], out: Path, max_images: int = 64,
               inputs: Optional[dict[Path, list[Path]]] = None) -> Path | None:
    """`inputs`: an image's input files (images, then the mask), drawn before it in the same row of cells."""
    paths = paths[:max_images]
    if not paths:
        return None
    inputs = inputs or {}
    per = 1 + max((len(inputs.get(p, [])) for p in paths), default=0)  # cells per image: its inputs, then itself
    if per == 1:
        cols = min(len(paths), max(1, math.ceil(math.sqrt(len(paths)))))
    else:  # one image with its inputs per row part, up to about 8 cells wide
        cols = per * min(len(paths), max(1, 8 // per))
    cells: list[tuple[Optional[Path], str]] = []
    for p in paths:
        given = inputs.get(p, [])
        cells += [(q, f"in: {q.stem}"[:30]) for q in given] + [(None, "")] * (per - 1 - len(given))
        cells.append((p, p.stem[:30]))
    rows = math.ceil(len(cells) / cols)
    sheet = Image.new("RGB", (cols * THUMB, rows * (THUMB + LABEL_H)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (p, label) in enumerate(cells):
        if p is None:
            continue
        with Image.open(p) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            x, y = (i % cols) * THUMB, (i // cols) * (THUMB + LABEL_H)
            sheet.paste(im, (x + (THUMB - im.width) // 2, y + (THUMB - im.height) // 2))
            draw.text((x + 2, y + THUMB + 1), label, fill="black")
    atomic_write_bytes(out, png_bytes(sheet, None))
    return out
