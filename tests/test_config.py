"""Every config group option composes; bad values fail before any model is built, naming the key."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from conftest import CONF_DIR, compose, run_config
from pipeline.config.schema import DType, Precision, QuantMode, RunConfig
from pipeline.errors import ConfigError

GROUPS = ("model", "quantization", "sampler", "job")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if group == "model" and option in ("flux.1-dev", "flux.1-schnell", "qwen-image"):
        overrides.append("model.path=/models/somewhere")
    run = run_config(overrides)
    assert isinstance(run, RunConfig)
    assert getattr(run, group) is not None


def test_defaults_are_tiny_flux_auto_quant_default_sampler_demo_job():
    run = run_config()
    assert run.model.name == "tiny-flux" and run.model.family == "flux"
    assert run.quantization.mode == QuantMode.auto and run.quantization.path is None
    assert run.sampler.name == "default" and run.sampler.dtype == DType.auto
    assert run.job.manifest == "jobs/demo.jsonl"


@pytest.mark.parametrize(
    "preset,precision,rank,unsigned",
    [("int4_r32", Precision.int4, 32, True), ("int4_r128", Precision.int4, 128, True),
     ("nvfp4_r32", Precision.nvfp4, 32, False), ("nvfp4_r128", Precision.nvfp4, 128, False)],
)
def test_quantization_presets_fill_manual_settings(preset, precision, rank, unsigned):
    q = run_config([f"quantization={preset}"]).quantization
    assert (q.mode, q.enable, q.precision, q.rank, q.act_unsigned, q.preset) == (
        QuantMode.manual, True, precision, rank, unsigned, preset)


@pytest.mark.parametrize("n", [4, 8])
def test_lightning_sampler_presets(n):
    s = run_config([f"sampler=lightning-{n}step"]).sampler
    assert s.steps == n and s.true_cfg_scale == 1.0 and s.name == f"lightning-{n}step"


def test_typo_in_key_fails_at_composition_naming_it():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["sampler.stpes=4"])
    text = str(e.value) + str(e.value.__cause__)
    assert "sampler.stpes" in text and "not in 'SamplerConfig'" in text


@pytest.mark.parametrize(
    "override,phrase",
    [("sampler.stpes=4", "did you mean sampler.steps?"),
     ("sampler.scheduler.shfit=3", "did you mean sampler.scheduler.shift?"),
     ("quantization.precison=int4", "did you mean quantization.precision?"),
     ("jobb.batch_size=2", "did you mean job?")],
)
def test_unknown_keys_get_a_suggestion(override, phrase):
    from pipeline.config.validate import unknown_override_keys

    problems = unknown_override_keys([override])
    assert len(problems) == 1 and problems[0][0] == override.split("=")[0]
    assert phrase in problems[0][1]


def test_known_keys_groups_and_hydra_keys_pass_the_precheck():
    from pipeline.config.validate import unknown_override_keys

    ok = ["model=tiny-qwen-image", "sampler.steps=4", "sampler.scheduler.shift=3", "model.tiny.seed=1",
          "hydra.run.dir=/tmp/x", "+sampler.steps=4", "-m", "quantization=none,int4_r32"]
    assert unknown_override_keys(ok) == []


def test_wrong_type_fails_at_composition_naming_key_and_value():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["sampler.steps=four"])
    text = str(e.value) + str(e.value.__cause__)
    assert "sampler.steps" in text and "four" in text


def test_bad_enum_lists_allowed_values():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["quantization.precision=int8"])
    text = str(e.value.__cause__)
    assert isinstance(e.value.__cause__, ValidationError)
    assert "int4" in text and "nvfp4" in text


@pytest.mark.parametrize(
    "override,key,phrase",
    [
        ("sampler.steps=0", "sampler.steps", "1..1000"),
        ("sampler.height=1000", "sampler.height", "multiple of 16"),
        ("sampler.width=8", "sampler.width", "multiple of 16"),
        ("sampler.guidance=-1", "sampler.guidance", "0..100"),
        ("job.batch_size=0", "job.batch_size", "1..256"),
        ("quantization.rank=20", "quantization.rank", "multiple of 16"),
        ("job.progress=fancy", "job.progress", "auto, rich, plain, none"),
    ],
)
def test_out_of_range_values_fail_before_model_build(override, key, phrase):
    with pytest.raises(ConfigError) as e:
        run_config([override])
    assert any(k == key and phrase in msg for k, msg in e.value.problems), e.value.problems
    assert key in str(e.value)


def test_height_error_suggests_nearest_allowed_sizes():
    with pytest.raises(ConfigError) as e:
        run_config(["sampler.height=1000"])
    assert "992 or 1008" in str(e.value)


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as e:
        run_config(["sampler.steps=0", "job.batch_size=0"])
    assert {k for k, _ in e.value.problems} == {"sampler.steps", "job.batch_size"}


def test_nvfp4_with_unsigned_activations_is_rejected():
    with pytest.raises(ConfigError, match="quantization.act_unsigned"):
        run_config(["quantization=nvfp4_r32", "quantization.act_unsigned=true"])


def test_pretrained_model_needs_a_path_or_hub_id():
    with pytest.raises(ConfigError, match="model.path"):
        run_config(["model=flux.1-dev", "model.hf_id=null"])


def test_overrides_reach_the_typed_config():
    run = run_config(["model=tiny-qwen-image", "sampler.steps=7", "sampler.seed=11", "job.batch_size=2"])
    assert run.model.family == "qwen-image"
    assert (run.sampler.steps, run.sampler.seed, run.job.batch_size) == (7, 11, 2)


def test_qwen_image_refuses_one_step_everywhere(tmp_path):
    with pytest.raises(ConfigError, match="sampler.steps: tiny-qwen-image needs at least 2 steps"):
        run_config(["model=tiny-qwen-image", "sampler.steps=1"])
    from pipeline.errors import ManifestError
    from pipeline.runner import load_manifest

    m = tmp_path / "m.jsonl"
    m.write_text('{"prompt": "a", "steps": 1}\n{"prompt": "b"}\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:1: steps: tiny-qwen-image needs at least 2 steps, got 1"):
        load_manifest(run_config(["model=tiny-qwen-image", f"job.manifest={m}"]))
    skipped = load_manifest(run_config(["model=tiny-qwen-image", f"job.manifest={m}", "job.on_error=skip"]))
    assert [r.line for r in skipped.rows] == [2] and skipped.problems[0].line == 1
