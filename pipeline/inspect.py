"""`svdq-batch inspect FILE...` (or `python -m pipeline.inspect`): what an svdq-*.safetensors file is.

Why: before a run (or before trusting a multi-GB download) a user wants to know a file's precision, rank, naming
scheme and the 16-bit model it was made for, and whether its name, metadata and tensors agree; all of that is in
the header, so no tensor is read. `--json` prints the same facts for scripts.
Exit status: 0 every file is fine; 1 a file is readable but has problems; 2 a file is missing, unreadable or not
an SVDQuant file (one `error: FILE: ...` line on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from pipeline.errors import QuantizationError
from pipeline.quantization.file_info import SHAPE_KEYS, CheckpointInfo, config_mismatches, inspect_checkpoint
from pipeline.quantization.plan import parse_weight_filename

MODEL_CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "models" / "configs"
FILE_NAME_TOKENS = {"int4": "int4", "nvfp4": "fp4"}  # what Nunchaku's file names call each precision
METADATA_KEYS = ("config", "comfy_config", "quantization_config", "model_class", "svdq_batch")


def naming_readers(naming: str, architecture: Optional[str]) -> tuple[list[str], str]:
    """Which programs load a file's tensor-naming scheme (file_names.py explains the schemes), and what it is."""
    from pipeline.quantization.architecture import architecture as get_architecture

    try:
        arch = get_architecture(architecture) if architecture else None
    except ValueError:
        arch = None
    if arch is None:
        return ["svdq-batch"], "tensor names of an unknown model family"
    engine = ["nunchaku", "comfyui-nunchaku", "svdq-batch"] if arch.engine_class else ["svdq-batch"]
    if naming == "legacy":
        return engine, (f"{arch.name} per-block names (qkv_proj, lora_down, smooth, ...): what Nunchaku and "
                        "ComfyUI-nunchaku load; svdq-batch reads them too")
    if arch.naming == "legacy":
        return ["svdq-batch"], ("module paths (attn.to_qkv, proj_down, ...): svdq-batch reads them, Nunchaku's and "
                                f"ComfyUI-nunchaku's {arch.name} loaders do not (svdq-quantize "
                                "quantization.naming=legacy writes the names they read)")
    if arch.engine_class:
        return engine, (f"module paths (attn.to_qkv, proj_down, ...): the {arch.name} naming Nunchaku, "
                        "ComfyUI-nunchaku and svdq-batch read")
    return engine, f"module paths: svdq-batch's own layout for {arch.name} (Nunchaku publishes no engine for it)"


@dataclasses.dataclass(frozen=True)
class KnownModel:
    """A model conf/model/ names, with its transformer's diffusers config (what a file must fit)."""

    name: str
    family: str
    source: str  # tiny | pretrained
    hf_id: Optional[str]
    config: dict


@lru_cache(maxsize=1)
def known_models() -> tuple[KnownModel, ...]:
    """Every conf/model/*.yaml with a transformer config: the real ones' configs/*.json, the tiny ones' spec."""
    import yaml

    models = []
    for conf in sorted(MODEL_CONF_DIR.glob("*.yaml")):
        spec = yaml.safe_load(conf.read_text()) or {}
        name, family, source = spec.get("name", conf.stem), spec.get("family"), spec.get("source")
        if source == "tiny":
            config = _tiny_config(family, spec.get("tiny") or {})
        else:
            json_path = MODEL_CONFIG_DIR / f"{name}.json"
            if not json_path.is_file():
                continue
            config = json.loads(json_path.read_text())
        models.append(KnownModel(name, family, source, spec.get("hf_id"), config))
    return tuple(models)


def _tiny_config(family: str, tiny: dict) -> dict:
    from pipeline.config.schema import TinySpec
    from pipeline.models.tiny import tiny_transformer_config

    names = {f.name for f in dataclasses.fields(TinySpec)}
    return tiny_transformer_config(family, TinySpec(**{k: v for k, v in tiny.items() if k in names}))


def _architecture_name(family: Optional[str]) -> Optional[str]:
    from pipeline.families import family as get_family

    try:
        return get_family(family).architecture.name if family else None
    except ValueError:
        return None


def fitting_models(info: CheckpointInfo) -> tuple[list[str], Optional[str], dict[str, list[str]]]:
    """(models the file fits, how that was decided: config | blocks | None, mismatches per same-family model).

    With `config` metadata: the shape-defining keys must agree. Without: only the block counts can be compared.
    """
    if not info.config and not info.blocks:
        return [], None, {}
    same_family = [m for m in known_models() if info.family in (None, _architecture_name(m.family))]
    fits, mismatches = [], {}
    for m in same_family:
        if info.config:
            common = [k for k in SHAPE_KEYS if k in info.config and k in m.config]
            wrong = config_mismatches(info.config, m.config) if common else ["no shape-defining key in common"]
        else:
            wrong = [f"{k}: file {n}, model {m.config.get(k)}" for k, n in info.blocks.items() if m.config.get(k) != n]
        if wrong:
            mismatches[m.name] = wrong
        else:
            fits.append(m.name)
    return named_in_file(fits, info.path), ("config" if info.config else "blocks") if fits else None, mismatches


def named_in_file(fits: list[str], path: str) -> list[str]:
    """Of several models a file fits by shape (FLUX.1-dev and Kontext have one config), those its file name names
    (the longest name where one contains another: tiny-flux-kontext, not tiny-flux); all of them if it names none."""
    stem = Path(path).name.lower()
    named = [m for m in fits if m.lower() in stem]
    named = [m for m in named if not any(m != o and m.lower() in o.lower() for o in named)]
    return named if len(fits) > 1 and named else fits


def name_conflicts(from_name: Optional[dict], info: CheckpointInfo) -> list[str]:
    """What the file name says that the tensors contradict (the tensors are what a run uses)."""
    return [f"the file name says {key}={from_name[key]} but the tensors are {key}={getattr(info, key)}"
            for key in ("precision", "rank") if from_name and from_name[key] != getattr(info, key)]


def run_commands(path: Path, fits: list[str], from_name: Optional[dict], info: CheckpointInfo,
                 forced: bool) -> list[str]:
    """The `python -m pipeline ...` line that runs the file, one per model it fits."""
    by_name = {m.name: m for m in known_models()}
    extra = []
    if from_name is None:  # auto mode cannot tell precision and rank from this name
        extra += [f"quantization.precision={info.precision}", f"quantization.rank={info.rank}"]
    if forced:
        extra.append("quantization.force=true")
    if from_name and from_name.get("lightning"):
        steps = "8step" if "8step" in path.name.lower() else "4step"
        extra.append(f"sampler=lightning-{steps}")
    commands = []
    for name in fits:
        m = by_name[name]
        args = ["python", "-m", "pipeline", f"model={name}"]
        if m.source != "tiny":
            args.append(f"model.path=/models/{(m.hf_id or name).split('/')[-1]}")
        args += [f"quantization.path={path.resolve()}", *extra]
        commands.append(" ".join(shlex.quote(a) for a in args))
    return commands


def describe(path: str | Path) -> dict[str, Any]:
    """Everything `inspect` reports about one file; raises QuantizationError for a file it cannot read."""
    path = Path(path)
    if not path.exists():
        raise QuantizationError(f"{path}: no such file")
    if not path.is_file():
        raise QuantizationError(f"{path}: not a file")
    info = inspect_checkpoint(path)
    from_name = parse_weight_filename(str(path))
    misnamed = name_conflicts(from_name, info)
    problems = misnamed + list(info.problems)
    # a run refuses a file whose name or quantization_config contradicts its tensors, unless forced
    forced = bool(misnamed) or any(said not in (None, getattr(info, key)) for key, said in
                                   (("precision", info.metadata_precision), ("rank", info.metadata_rank)))
    fits, fits_by, mismatches = fitting_models(info)
    notes = list(info.notes)
    if from_name is None:
        notes.append("the file name does not say precision and rank (Nunchaku names files "
                     "svdq-{int4|fp4}_r{rank}-<model>.safetensors): a run must set them")
    if not fits:
        notes.append("no known model fits this file" if info.config or info.blocks
                     else "unknown model: the file has no config metadata and no block names")
    elif fits_by == "blocks":
        notes.append("the file has no config metadata: the model is matched by its block counts only")
    readers, naming_text = naming_readers(info.naming, info.family)
    return {
        "path": str(path), "file": path.name,
        "precision": info.precision, "precision_token": FILE_NAME_TOKENS[info.precision], "rank": info.rank,
        "naming": info.naming, "naming_readers": readers, "naming_text": naming_text,
        "model_class": info.model_class, "family": info.family, "act_unsigned": info.act_unsigned,
        "w4a4_layers": info.w4a4_layers, "awq_layers": info.awq_layers, "blocks": dict(sorted(info.blocks.items())),
        "tensors": info.tensors, "bytes": info.bytes, "gb": info.bytes / 1e9, "gib": info.bytes / 2 ** 30,
        "said_by": {"file_name": from_name,
                    "metadata": {"precision": info.metadata_precision, "rank": info.metadata_rank},
                    "tensors": {"precision": info.precision, "rank": info.rank}},
        "metadata": {k: k in info.metadata_keys for k in METADATA_KEYS}, "config": info.config,
        "fits": fits, "fits_by": fits_by, "mismatches": mismatches,
        "run": run_commands(path, fits, from_name, info, forced),
        "problems": problems, "notes": notes, "ok": not problems,
    }


# ---------- human output ----------

def _said(d: Optional[dict]) -> str:
    if not d or (d.get("precision") is None and d.get("rank") is None):
        return "-"
    return f"{d.get('precision') or '?'} r{d['rank'] if d.get('rank') is not None else '?'}"


def _size(n: int) -> str:
    return f"{n:,} bytes = {n / 1e9:.3g} GB = {n / 2 ** 30:.3g} GiB"


def format_report(r: dict[str, Any]) -> str:
    """An aligned `label  value` list for one file."""
    token = f" (file-name token {r['precision_token']})" if r["precision_token"] != r["precision"] else ""
    said = r["said_by"]
    blocks = ", ".join(f"{k}={v}" for k, v in sorted(r["blocks"].items())) or "-"
    fits = ", ".join(r["fits"]) or "unknown"
    if r["fits_by"] == "config":
        fits += " (by its config metadata)"
    elif r["fits_by"] == "blocks":
        fits += " (by block counts only)"
    rows = [
        ("path", r["path"]),
        ("precision", r["precision"] + token),
        ("rank", str(r["rank"])),
        ("name/meta/tensors", f"file name {_said(said['file_name'])} | metadata {_said(said['metadata'])} | "
                              f"tensors {_said(said['tensors'])}"),
        ("naming", f"{r['naming']}: {r['naming_text']}"),
        ("model class", f"{r['model_class'] or '-'} (family {r['family'] or 'unknown'})"),
        ("layers", f"{r['w4a4_layers']} W4A4 (SVDQuant) + {r['awq_layers']} AWQ (W4A16)"),
        ("blocks", blocks),
        ("tensors", str(r["tensors"])),
        ("size", _size(r["bytes"])),
        ("metadata", ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in r["metadata"].items())),
        ("fits model", fits),
    ]
    if not r["fits"]:
        rows += [("differs from", f"{name}: {'; '.join(wrong)}") for name, wrong in r["mismatches"].items()]
    rows += [("run it", c) for c in r["run"]]
    rows += [("problem", p) for p in r["problems"]] or [("problems", "none")]
    rows += [("note", n) for n in r["notes"]]
    width = max(len(label) for label, _ in rows)
    return "\n".join([r["file"]] + [f"  {label:<{width}}  {value}" for label, value in rows])


# ---------- entry ----------

def _error_text(path: str, e: QuantizationError) -> str:
    """The error without a repeated file name, on one line."""
    text = " ".join(str(e).split())
    for prefix in (f"{path}: ", f"quantization.path={path}: "):
        text = text.removeprefix(prefix)
    return text


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="svdq-batch inspect",
        description="What an svdq-*.safetensors file is, read from its header (no tensor is loaded).")
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file (a list for several)")
    args = parser.parse_args(argv)
    reports, status = [], 0
    for file in args.files:
        try:
            report = describe(file)
        except QuantizationError as e:
            message = _error_text(file, e)
            print(f"error: {file}: {message}", file=sys.stderr)
            reports.append({"path": file, "error": message})
            status = 2
            continue
        reports.append(report)
        status = max(status, 0 if report["ok"] else 1)
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    else:
        shown = [format_report(r) for r in reports if "error" not in r]
        if shown:
            print("\n\n".join(shown))
    return status


if __name__ == "__main__":
    sys.exit(main())
