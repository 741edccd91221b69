"""Input images of a manifest row (edit and inpainting models): found, checked once, hashed, loaded.

A row's `image` (one path, or a list for multi-image editing) and `mask` name files relative to the
manifest's folder (absolute paths and `~` work too). Each file is checked when the manifest is read,
before any model is loaded: it exists, Pillow can read it, each side is 16..4096 px. Its sha256 goes
into the settings hash of every image made from it, so a changed input makes resume regenerate, and
`load_input` refuses a file that changed after it was checked.

EXIF orientation is applied (as diffusers' `load_image` does): `width`/`height` are the upright size.
A multi-frame file (GIF, APNG, TIFF) gives its first frame.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Optional

from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.config.schema import MAX_SIDE, SIZE_MULTIPLE

# What a model family takes per row (Family.inputs): defined here, with the checks, so reading a manifest
# imports no model code.
INPUT_KINDS = ("text", "image", "images", "image+mask")
MAX_INPUT_IMAGES = {"text": 0, "image": 1, "images": 3, "image+mask": 1}
MIN_INPUT_SIDE = SIZE_MULTIPLE  # 16 px
MAX_INPUT_SIDE = MAX_SIDE  # 4096 px
MAX_INPUT_PIXELS = MAX_SIDE * MAX_SIDE
ROLES = {"image": "RGB", "mask": "L"}  # role -> the mode load_input returns
LIST_SEPARATOR = "|"  # several images in one CSV/TSV cell: a.png|b.png
_ORIENTATION = 0x0112  # EXIF tag; values 5..8 turn the image a quarter


class InputImageError(ValueError):
    """An input image that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class InputImage:
    """One checked input file of a row. `given` is the path as the manifest wrote it, `path` the absolute one."""

    role: str  # "image" | "mask"
    given: str
    path: str
    sha256: str
    width: int
    height: int
    mode: str  # the file's Pillow mode (load_input converts: RGB for an image, L for a mask)


def resolve_input(given: str, manifest_dir: Path) -> Path:
    """The absolute path of `given`: `~` expanded, a relative path taken from the manifest's folder."""
    p = Path(os.path.expanduser(given))
    if not p.is_absolute():
        p = Path(manifest_dir) / p
    return p.resolve()


def check_input(given: str, manifest_dir: Path, role: str) -> InputImage:
    """Check one input file and describe it; raises InputImageError saying what is wrong.

    Refused: a missing file, a folder, a file Pillow cannot read (unknown format, or damaged data),
    a side under 16 px or over 4096 px, more than 4096*4096 pixels. A mask may be in any mode: it is
    converted to single-channel "L" when loaded (white: repaint, black: keep; an alpha channel is
    dropped, not used as the mask); an image is converted to "RGB". The pixels are not decoded here
    (Pillow's `verify()` plus the header), so checking is cheap; the sha256 is of the file's bytes.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    path = resolve_input(given, manifest_dir)
    if not path.exists():
        raise InputImageError(f"no such file: {path}")
    if path.is_dir():
        raise InputImageError(f"{path} is a folder, not an image file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputImageError(f"cannot read {path}: {e.strerror or e}") from None
    width, height, mode = _probe(data, path)
    if not _convertible(mode, ROLES[role]):
        raise InputImageError(f"{path}: Pillow mode {mode!r} cannot be converted to {ROLES[role]} (the {role} mode)")
    return InputImage(role=role, given=given, path=str(path), sha256=hashlib.sha256(data).hexdigest(),
                      width=width, height=height, mode=mode)


def load_input(img: InputImage) -> Image.Image:
    """The image as the model takes it: RGB for an image, L for a mask, EXIF orientation applied.

    The file is read once and its sha256 compared with the checked one: a file changed (or gone) since
    the manifest was read is an InputImageError naming it, never silently another input."""
    path = Path(img.path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputImageError(f"{path} ({img.role} {img.given!r}) cannot be read any more: {e.strerror or e}"
                              ) from None
    now = hashlib.sha256(data).hexdigest()
    if now != img.sha256:
        raise InputImageError(f"{path} ({img.role} {img.given!r}) changed after the manifest was checked "
                              f"(sha256 {img.sha256[:12]}... then, {now[:12]}... now); rerun to use the new file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                upright = ImageOps.exif_transpose(im)
                return upright.convert(ROLES[img.role])
    except Exception as e:  # a truncated JPEG passes verify() and fails only here
        raise InputImageError(f"{path}: cannot decode the image: {e}") from None


def _probe(data: bytes, path: Path) -> tuple[int, int, str]:
    """(upright width, height, mode) of an image file's bytes, without decoding its pixels."""
    fmt = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.verify()  # structure and checksums (PNG CRCs), no pixel decoding
            with Image.open(io.BytesIO(data)) as im:  # verify() leaves the image unusable: reopen
                width, height, mode = im.width, im.height, im.mode
                orientation = im.getexif().get(_ORIENTATION)
    except Image.DecompressionBombError as e:
        raise InputImageError(f"{path} is too large: more than {MAX_INPUT_PIXELS} pixels ({e})") from None
    except UnidentifiedImageError:
        raise InputImageError(f"{path} is not an image Pillow can read: unknown format (the file starts with "
                              f"{data[:12]!r})") from None
    except Exception as e:  # damaged data: Pillow raises OSError, SyntaxError, struct.error, ...
        raise InputImageError(f"{path}: damaged {fmt or 'image'} data: {e}") from None
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    size = f"{width}x{height} px"
    if min(width, height) < MIN_INPUT_SIDE:
        raise InputImageError(f"{path} is {size}: each side must be at least {MIN_INPUT_SIDE} px")
    if max(width, height) > MAX_INPUT_SIDE:
        raise InputImageError(f"{path} is {size}: each side must be at most {MAX_INPUT_SIDE} px")
    if width * height > MAX_INPUT_PIXELS:
        raise InputImageError(f"{path} is {size}: at most {MAX_INPUT_PIXELS} pixels")
    return width, height, mode


@lru_cache(maxsize=None)
def _convertible(mode: str, target: str) -> bool:
    try:
        Image.new(mode, (1, 1)).convert(target)
        return True
    except (ValueError, OSError, KeyError):
        return False


class InputChecker:
    """Checks the input images of a manifest's rows against the model's input kind (`INPUT_KINDS`).

    Each distinct file is checked once (by resolved path and role), so rows sharing an image cost a dict
    lookup. `row()` returns the row's InputImages and its problems as (field, message), field "image" or
    "mask"."""

    def __init__(self, kind: str, manifest_dir: Path, fmt: str = "", tabular: bool = False):
        if kind not in INPUT_KINDS:
            raise ValueError(f"inputs must be one of {', '.join(INPUT_KINDS)}, got {kind!r}")
        self.kind, self.dir, self.fmt = kind, Path(manifest_dir), fmt
        self.where = "column" if tabular else "field"
        self._resolved: dict[str, Path] = {}
        self._checked: dict[tuple[Path, str], InputImage | InputImageError] = {}

    def check(self, given: str, role: str) -> InputImage:
        """check_input, once per resolved path and role; raises InputImageError."""
        path = self._resolved.get(given)
        if path is None:
            path = self._resolved[given] = resolve_input(given, self.dir)
        got = self._checked.get((path, role))
        if got is None:
            try:
                got = check_input(given, self.dir, role)
            except InputImageError as e:
                got = e
            self._checked[(path, role)] = got
        if isinstance(got, InputImageError):
            raise got
        return got if got.given == given else replace(got, given=given)

    def row(self, images: tuple[str, ...], mask: Optional[str], bare: bool = False
            ) -> tuple[tuple[InputImage, ...], Optional[InputImage], list[tuple[str, str]]]:
        """`bare`: the row is a bare prompt string (a .txt line, an item of a JSON list of strings)."""
        problems: list[tuple[str, str]] = []
        kind, most = self.kind, MAX_INPUT_IMAGES[self.kind]
        if kind == "text":
            if images:
                problems.append(("image", "this model is text-to-image: it takes no input image; use an edit model "
                                          f"(model=...) or drop the {self.where}"))
            if mask is not None:
                problems.append(("mask", "this model takes no mask: only an inpainting model (model=...) does; "
                                         f"drop the {self.where}"))
            return (), None, problems
        what = "1 to 3 input images" if kind == "images" else "an input image"
        if not images:
            if bare:
                txt = " (a .txt manifest holds prompts only)" if self.fmt == "txt" else ""
                problems.append(("image", f"missing: this model edits {what}, and this row is a bare prompt{txt}; "
                                          "use a JSONL, JSON, YAML, CSV or TSV manifest whose rows have an `image` "
                                          "field"))
            else:
                problems.append(("image", f"missing: this model edits {what}; give its path in an `image` "
                                          f"{self.where} (relative to the manifest's folder)"))
        elif len(images) > most:
            problems.append(("image", f"this model takes one input image, got {len(images)}" if most == 1 else
                                      f"this model takes at most {most} input images, got {len(images)}"))
        if kind == "image+mask" and mask is None:
            problems.append(("mask", "missing: this inpainting model needs a mask (white: repaint, black: keep); "
                                     f"give its path in a `mask` {self.where}"))
        elif kind != "image+mask" and mask is not None:
            problems.append(("mask", "this model takes no mask: only an inpainting model (model=...) does; "
                                     f"drop the {self.where}"))
            mask = None
        found = []
        for given in images:
            try:
                found.append(self.check(given, "image"))
            except InputImageError as e:
                hint = (f" (separate several images with {LIST_SEPARATOR!r})"
                        if ";" in given and str(e).startswith("no such file") else "")
                problems.append(("image", f"{e}{hint}"))
        checked_mask = None
        if mask is not None:
            try:
                checked_mask = self.check(mask, "mask")
            except InputImageError as e:
                problems.append(("mask", str(e)))
        return tuple(found), checked_mask, problems
