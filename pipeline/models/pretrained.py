"""Locate a real model's diffusers folder on this machine: a local path or the local HF cache.

Why: there is no network here and a download would hang or fail late; we look only locally and,
when nothing is there, say what was looked for, where, and how to get it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config.schema import ModelConfig
from pipeline.errors import ModelNotFoundError


def hf_cache_dir() -> Path:
    """The hub cache as huggingface_hub computes it (HF_HUB_CACHE / HF_HOME / ~/.cache)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_model_dir(model: ModelConfig) -> Path:
    """Return a folder holding `model_index.json` for `model`, or raise ModelNotFoundError."""
    looked: list[str] = []
    candidates = [c for c in (model.path, model.hf_id) if c]
    for ref in candidates:
        folder = Path(os.path.expanduser(ref))
        if folder.is_dir():
            if (folder / "model_index.json").is_file():
                return folder
            looked.append(f"{folder}: folder exists but has no model_index.json (not a diffusers pipeline folder)")
            continue
        looked.append(f"{folder}: no such local folder")
        if _looks_like_repo_id(ref):
            found, where = _from_hf_cache(ref, model.revision)
            if found is not None:
                return found
            looked.append(where)
    raise ModelNotFoundError(_not_found_message(model, looked))


def _looks_like_repo_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "~"))


def _from_hf_cache(repo_id: str, revision: str | None) -> tuple[Path | None, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hf_cache_dir()
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None, f"{cache / ('models--' + repo_id.replace('/', '--'))}: not in the local Hugging Face cache"
    if (folder / "model_index.json").is_file():
        return folder, ""
    return None, f"{folder}: cached snapshot has no model_index.json"


def _not_found_message(model: ModelConfig, looked: list[str]) -> str:
    repo = model.hf_id or model.path or model.name
    folder = f"/models/{repo.rstrip('/').split('/')[-1]}"
    steps = ([f"accept the licence at {model.license_url} (gated models)"] if model.license_url else []) + [
        f"hf download {repo} --local-dir {folder}",
        f"copy {folder} to this machine and run with model.path={folder}",
    ]
    lines = [f"Model '{model.name}' is not on this machine (nothing is downloaded at run time). Looked for:"]
    lines += [f"  - {item}" for item in looked]
    lines += ["To get it, on a machine with internet:"] + [f"  {i}. {s}" for i, s in enumerate(steps, 1)]
    lines += [
        "(or copy the Hugging Face cache folder to this machine's cache, "
        f"{hf_cache_dir()}). For an offline try-out use model=tiny-flux or model=tiny-qwen-image.",
    ]
    return "\n".join(lines)
