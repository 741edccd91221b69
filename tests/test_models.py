"""Model building: tiny models are deterministic; real models load from local folders only."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_config
from pipeline.errors import DeviceError, ModelNotFoundError
from pipeline.models import build_pipeline
from pipeline.models.build import resolve_device
from pipeline.models.tiny import build_tiny
from pipeline.config.schema import Device
from pipeline.runner import run_job


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-qwen-image"])
def test_tiny_models_are_the_real_architectures_and_bit_reproducible(model):
    cfg = run_config([f"model={model}"])
    a, b = build_tiny(cfg.model), build_tiny(cfg.model)
    expected = {"tiny-flux": "FluxPipeline", "tiny-qwen-image": "QwenImagePipeline"}[model]
    assert type(a).__name__ == expected
    sa, sb = a.transformer.state_dict(), b.transformer.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.tokenizer("a cat").input_ids == b.tokenizer("a cat").input_ids


def test_tiny_weights_seed_changes_weights():
    a = build_tiny(run_config().model)
    b = build_tiny(run_config(["model.tiny.seed=1"]).model)
    assert not torch.equal(a.transformer.x_embedder.weight, b.transformer.x_embedder.weight)


def test_building_does_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny(run_config().model)
    assert torch.equal(torch.rand(3), expected)


@pytest.fixture(scope="module")
def saved_tiny_flux(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "FLUX.1-dev"
    build_tiny(run_config().model).save_pretrained(folder)
    return folder


def test_real_model_entry_loads_a_local_diffusers_folder(saved_tiny_flux, tmp_path):
    """The flux.1-dev entry with model.path at a local folder makes the same image as the model saved there."""
    tiny = run_job(run_config(["job.limit=1", "job.progress=none", "quantization=none"]), tmp_path / "tiny")
    real = run_job(
        run_config(["model=flux.1-dev", f"model.path={saved_tiny_flux}", "job.limit=1", "job.progress=none",
                    "sampler.steps=4", "sampler.height=128", "sampler.width=128", "sampler.max_sequence_length=128"]),
        tmp_path / "real",
    )
    assert tiny["counts"]["made"] == real["counts"]["made"] == 1
    import numpy as np
    from PIL import Image

    pixels = [np.asarray(Image.open(tmp_path / f"{d}/cat_0.png")) for d in ("tiny", "real")]
    assert np.array_equal(*pixels)  # the PNG bytes differ only in the embedded model name
    assert json.loads((tmp_path / "real/cat_0.json").read_text())["model"] == "flux.1-dev"


@pytest.mark.parametrize("model,repo", [("flux.1-dev", "black-forest-labs/FLUX.1-dev"),
                                        ("flux.1-schnell", "black-forest-labs/FLUX.1-schnell"),
                                        ("qwen-image", "Qwen/Qwen-Image")])
def test_real_models_fail_fast_offline_saying_what_where_and_how(model, repo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    cfg = run_config([f"model={model}"])
    with pytest.raises(ModelNotFoundError) as e:
        build_pipeline(cfg.model, cfg.sampler)
    msg = str(e.value)
    assert f"Model '{model}' is not on this machine" in msg
    assert f"{repo}: no such local folder" in msg
    assert str(tmp_path / "empty-cache" / ("models--" + repo.replace("/", "--"))) in msg
    assert f"hf download {repo}" in msg and "model.path=" in msg


def test_folder_without_model_index_is_named(tmp_path):
    cfg = run_config(["model=qwen-image", f"model.path={tmp_path}", "model.hf_id=null"])
    with pytest.raises(ModelNotFoundError, match="folder exists but has no model_index.json"):
        build_pipeline(cfg.model, cfg.sampler)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda_says_so():
    with pytest.raises(DeviceError, match="sampler.device=cuda but no CUDA device"):
        resolve_device(Device.cuda)
