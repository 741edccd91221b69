"""Find the variants (runs) of a folder, match each one's images with the reference's by (id, seed), score pairs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from pipeline.config.schema import ReportConfig
from pipeline.outputs.atomic import read_json_object
from pipeline.sweep import job_number

log = logging.getLogger("pipeline")
COMPARED = ("height", "width", "steps", "prompt")  # a pair differing in any of these is a mismatch, not compared
LOWER_IS_BETTER = {"lpips", "fid"}


class ReportError(Exception):
    """Something the user can fix (no runs, no reference)."""


def find_runs(folder: Path) -> list[Path]:
    if (folder / "run.json").is_file():
        return [folder]
    return sorted((d for d in folder.iterdir() if d.is_dir() and (d / "run.json").is_file()), key=job_number)


def variant(run_dir: Path) -> dict[str, Any]:
    rec = read_json_object(run_dir / "run.json") or {}
    q = rec.get("quantization") or {}
    plan, summary = q.get("plan") or {}, q.get("summary") or {}
    mem = rec.get("memory") or {}
    enabled = bool(plan.get("enabled"))
    before, after = summary.get("bytes_before"), summary.get("bytes_after")
    return {
        "name": run_dir.name,
        "dir": str(run_dir),
        "label": f"{plan.get('precision')} r{plan.get('rank')}" if enabled else "16-bit",
        "quantized": enabled,
        "precision": plan.get("precision") if enabled else "16-bit",
        "rank": plan.get("rank") if enabled else None,
        "status": rec.get("status"),
        "overrides": rec.get("overrides") or [],
        "latency_s": (rec.get("timing") or {}).get("per_image_mean_s"),
        "peak_mem_bytes": mem.get("peak_cuda_allocated_bytes") or mem.get("peak_rss_bytes"),
        "bytes_before": before,
        "bytes_after": after,
        "weight_ratio": round(after / before, 4) if before and after else None,
    }


def images(run_dir: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(id, seed) -> sidecar (with its PNG present) for every finished image of a run."""
    found = {}
    for side in sorted(run_dir.glob("*.json")):
        if side.name == "run.json":
            continue
        d = read_json_object(side)
        if not d or "file" not in d or "id" not in d or "seed" not in d:
            continue
        if (run_dir / d["file"]).is_file():
            found[(str(d["id"]), int(d["seed"]))] = d
    return found


class _Fallback:
    """PSNR only, when pipeline.quality.metrics is not there."""

    def __init__(self, cfg: ReportConfig) -> None:
        self.skipped = {"ssim": "pipeline.quality.metrics is not installed", "ms_ssim": "idem", "lpips": "idem",
                        "fid": "idem", "clip_score": "idem"}

    def pair(self, ref: Image.Image, img: Image.Image) -> dict[str, float]:
        a = np.asarray(ref, dtype=np.float64)
        b = np.asarray(img, dtype=np.float64)
        mse = float(np.mean((a - b) ** 2))
        return {"psnr": 100.0 if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))}

    def fid(self, ref_paths, paths):
        return None

    def clip_score(self, paths, prompts):
        return None


def metrics_for(cfg: ReportConfig):
    try:
        from pipeline.quality.metrics import Metrics
    except ImportError as e:
        log.warning("quality metrics unavailable (%s): PSNR only", e)
        return _Fallback(cfg)
    return Metrics(cfg)


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _thumb(img: Image.Image, side: int, dest: Path) -> None:
    t = img.copy()
    t.thumbnail((side, side), Image.LANCZOS if max(img.size) > side else Image.NEAREST)
    if max(t.size) < side:  # tiny images: scale up (nearest) so the page shows them at thumbnail size
        f = side / max(t.size)
        t = t.resize((max(1, round(t.width * f)), max(1, round(t.height * f))), Image.NEAREST)
    dest.parent.mkdir(parents=True, exist_ok=True)
    t.save(dest, optimize=True)


def _input_thumbs(run_dir: Path, side: dict[str, Any], size: int, folder: Path, out: Path) -> list[dict[str, str]]:
    """An edit or inpainting image's inputs (its sidecar's `inputs`, found by sha256 in the run's run.json), as
    thumbnails for the page: [{role, name, thumb, image}]; inputs whose file is gone are left out."""
    given = side.get("inputs") or []
    if not given:
        return []
    run = read_json_object(run_dir / "run.json") or {}
    where = {i.get("sha256"): i.get("path") for i in (run.get("manifest") or {}).get("inputs") or []}
    found = []
    for i in given:
        path = Path(str(where.get(i.get("sha256")) or ""))
        if not path.is_file():
            continue
        dest = folder / f"{i.get('sha256', '')[:16]}.png"
        if not dest.is_file():
            _thumb(_rgb(path), size, dest)
        found.append({"role": str(i.get("role") or "image"), "name": path.name, "thumb": _rel(dest, out),
                      "image": _rel(path, out)})
    return found


def _diff(ref: Image.Image, img: Image.Image, side: int, dest: Path) -> None:
    """Absolute difference (mean over channels, scaled so the largest is bright) as a heat map."""
    from matplotlib import colormaps

    d = np.abs(np.asarray(ref, dtype=np.float32) - np.asarray(img, dtype=np.float32)).mean(axis=2)
    d = d / max(float(d.max()), 1.0)
    rgb = (colormaps["inferno"](d)[..., :3] * 255).astype(np.uint8)
    _thumb(Image.fromarray(rgb), side, dest)


def _summary(values: list[float], lower_better: bool) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max()),
            "worst": float(arr.max() if lower_better else arr.min())}


def _rel(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def collect(folder: Path, cfg: ReportConfig, reference: Optional[str], out: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder")
    runs = find_runs(folder)
    if not runs:
        raise ReportError(f"no run.json in {folder} nor in its subfolders: not a run or sweep folder")
    variants = [variant(r) for r in runs]
    if reference:
        ref_dir = Path(reference).resolve()
        if not (ref_dir / "run.json").is_file():
            raise ReportError(f"report.reference {reference}: no run.json there")
        variants = [v for v in variants if Path(v["dir"]) != ref_dir]
        ref = variant(ref_dir)
    else:
        refs = [v for v in variants if not v["quantized"]]
        if not refs:
            raise ReportError(f"no 16-bit (quantization=none) run in {folder}: set --reference RUN_DIR "
                              "(or report.reference)")
        ref = refs[0]
        variants = [v for v in variants if v is not ref]
    ref_dir = Path(ref["dir"])
    ref_images = images(ref_dir)
    metrics = metrics_for(cfg)
    thumbs = out / "thumbs"
    pairs, mismatches = [], []
    ref_thumbs: dict[tuple[str, int], str] = {}
    ref_cache: dict[tuple[str, int], Image.Image] = {}

    for key, side in ref_images.items():
        dest = thumbs / "_reference" / side["file"]
        ref_cache[key] = _rgb(ref_dir / side["file"])
        _thumb(ref_cache[key], cfg.thumbnail, dest)
        ref_thumbs[key] = _rel(dest, out)
    ref_inputs = {key: _input_thumbs(ref_dir, side, cfg.thumbnail, thumbs / "_inputs", out)
                  for key, side in ref_images.items()}

    for v in variants:
        vdir = Path(v["dir"])
        scores: dict[str, list[float]] = {}
        paths, ref_paths, prompts = [], [], []
        for key, side in sorted(images(vdir).items()):
            entry = {"variant": v["name"], "id": key[0], "seed": key[1], "file": side["file"],
                     "prompt": side.get("prompt")}
            rside = ref_images.get(key)
            if rside is None:
                mismatches.append({**entry, "reason": "no reference image with this id and seed"})
                continue
            diff = [f"{k}: {rside.get(k)!r} vs {side.get(k)!r}" for k in COMPARED if rside.get(k) != side.get(k)]
            if diff:
                mismatches.append({**entry, "reason": "; ".join(diff)})
                continue
            img = _rgb(vdir / side["file"])
            ref_img = ref_cache[key]
            if img.size != ref_img.size:
                mismatches.append({**entry, "reason": f"image size {ref_img.size} vs {img.size}"})
                continue
            m = {k: float(x) for k, x in metrics.pair(ref_img, img).items() if x is not None}
            for k, x in m.items():
                scores.setdefault(k, []).append(x)
            stem = Path(side["file"]).stem
            t, d = thumbs / v["name"] / side["file"], thumbs / v["name"] / f"{stem}.diff.png"
            _thumb(img, cfg.thumbnail, t)
            _diff(ref_img, img, cfg.thumbnail, d)
            pairs.append({**entry, "metrics": m, "image": _rel(vdir / side["file"], out), "thumb": _rel(t, out),
                          "diff": _rel(d, out), "ref_image": _rel(ref_dir / rside["file"], out),
                          "ref_thumb": ref_thumbs[key]})
            paths.append(str(vdir / side["file"]))
            ref_paths.append(str(ref_dir / rside["file"]))
            prompts.append(side.get("prompt") or "")
        v["pairs"] = len(paths)
        v["metrics"] = {k: _summary(x, k in LOWER_IS_BETTER) for k, x in scores.items()}
        v["set_metrics"] = {}
        if paths:
            fid = metrics.fid([str(p) for p in Path(cfg.fid_reference).glob("*.png")] if cfg.fid_reference
                              else ref_paths, paths)
            clip = metrics.clip_score(paths, prompts)
            for name, value in (("fid", fid), ("clip_score", clip)):
                if value is not None:
                    v["set_metrics"][name] = float(value)
    names = sorted({k for v in variants for k in v["metrics"]}, key=lambda k: (k != "psnr", k))
    return {"folder": str(folder), "reference": ref, "variants": variants, "pairs": pairs,
            "mismatches": mismatches, "metric_names": names,
            "set_metric_names": sorted({k for v in variants for k in v["set_metrics"]}),
            "skipped": dict(getattr(metrics, "skipped", {}) or {}),
            "reference_images": {f"{k[0]}_{k[1]}": {"prompt": s.get("prompt"), "thumb": ref_thumbs[k],
                                                    "image": _rel(ref_dir / s["file"], out), "inputs": ref_inputs[k]}
                                 for k, s in ref_images.items()}}
