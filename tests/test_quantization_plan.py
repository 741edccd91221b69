"""Quantization settings: inferred from svdq-{precision}_r{rank} file names, overridden manually."""

from __future__ import annotations

import pytest

from conftest import run_config
from pipeline.errors import QuantizationError
from pipeline.quantization import parse_weight_filename, resolve_plan


@pytest.mark.parametrize(
    "name,expected",
    [
        ("svdq-int4_r32-qwen-image.safetensors", {"precision": "int4", "rank": 32}),
        ("/m/svdq-fp4_r128-flux.1-dev.safetensors", {"precision": "nvfp4", "rank": 128}),
        ("svdq-nvfp4_r32-x.safetensors", {"precision": "nvfp4", "rank": 32}),
        ("svdq-int4_r32-qwen-image-lightningv1.0-4steps.safetensors", {"precision": "int4", "rank": 32, "lightning": True}),
        ("diffusion_pytorch_model.safetensors", None),
    ],
)
def test_parse_weight_filename(name, expected):
    assert parse_weight_filename(name) == expected


def plan(*overrides):
    return resolve_plan(run_config(list(overrides)).quantization)


def test_auto_without_file_quantizes_tiny_models_in_process():
    p = plan()
    assert (p.enabled, p.precision, p.rank, p.act_unsigned, p.decided_by) == (True, "int4", 32, True, "auto")
    assert "quantizing the tiny model in-process" in p.notes[0]
    p = plan("quantization.precision=nvfp4", "quantization.rank=64")
    assert (p.precision, p.rank, p.act_unsigned) == ("nvfp4", 64, False)


def test_auto_without_file_keeps_real_models_16_bit():
    from pipeline.config.schema import ModelSource

    p = resolve_plan(run_config(["model=flux.1-dev"]).quantization, ModelSource.pretrained)
    assert not p.enabled and p.decided_by == "none" and "no quantization.path" in p.notes[0]
    assert not plan("quantization.on_the_fly=never").enabled


def test_none_is_off():
    assert not plan("quantization=none").enabled


def test_auto_reads_precision_and_rank_from_the_name():
    p = plan("quantization.path=/m/svdq-int4_r32-qwen-image.safetensors")
    assert (p.enabled, p.precision, p.rank, p.act_unsigned, p.decided_by) == (True, "int4", 32, True, "filename")
    assert p.detected == {"precision": "int4", "rank": 32}


def test_manual_settings_override_the_name_and_say_so():
    p = plan("quantization.path=/m/svdq-int4_r32-qwen-image.safetensors", "quantization.rank=128")
    assert (p.rank, p.decided_by) == (128, "manual")
    assert "rank=128 set manually overrides rank=32 from the file name" in p.notes


def test_lightning_file_recommends_lightning_sampler():
    p = plan("quantization.path=/m/svdq-fp4_r32-qwen-image-lightningv1.1-8steps.safetensors")
    assert p.precision == "nvfp4" and p.act_unsigned is False
    assert any("lightning-4step or lightning-8step" in n for n in p.notes)


def test_presets_and_manual():
    p = plan("quantization=int4_r128")
    assert (p.enabled, p.precision, p.rank, p.act_unsigned, p.decided_by) == (True, "int4", 128, True, "preset")
    assert plan("quantization=manual", "quantization.enable=false").enabled is False


def test_unreadable_name_in_auto_mode_says_how_to_fix():
    with pytest.raises(QuantizationError) as e:
        plan("quantization.path=/m/model.safetensors")
    assert "/m/model.safetensors" in str(e.value) and "quantization=manual quantization.precision=int4" in str(e.value)


def test_unreadable_name_is_fine_when_set_manually():
    p = plan("quantization=manual", "quantization.path=/m/model.safetensors", "quantization.rank=64")
    assert (p.precision, p.rank) == ("int4", 64)
