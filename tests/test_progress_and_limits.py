"""Step progress inside a pipeline call, progress lines of long jobs, prompt token limits, quantize output files.

Token counts are checked against what the tiny pipelines really feed their encoders (hooks on the text
encoders and the transformer), so they agree with diffusers' truncation, special tokens included.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch

from conftest import run_config
from pipeline.manifest import PromptRow
from pipeline.models.prompt_limits import (dropped_tokens, encoders_of, prompt_cuts, token_counts, truncated_rows,
                                           truncation_warning)
from pipeline.progress import ItemLog, _Plain, _Rich, progress, step_callback
from pipeline.tasks import expand

LONG = " ".join(["a watercolor painting of a lighthouse on a rocky coast at dawn"] * 8)


@pytest.fixture(scope="module")
def pipes():
    from pipeline.models import build_pipeline

    out = {}
    for model in ("tiny-flux", "tiny-qwen-image"):
        cfg = run_config([f"model={model}"])
        out[cfg.model.family] = build_pipeline(cfg.model, cfg.sampler)[0]
    return out


def call(pipe, prompt, max_sequence_length, steps=1, **kw):
    with torch.inference_mode():
        return pipe(prompt=[prompt], num_inference_steps=steps, height=32, width=32, output_type="latent",
                    max_sequence_length=max_sequence_length, true_cfg_scale=1.0,
                    generator=[torch.Generator().manual_seed(0)], **kw)


def fed_tokens(pipe, family: str, prompt: str, msl: int) -> dict[str, int]:
    """Tokens each encoder of the tiny pipeline really reads: FLUX's encoders' non-padding input ids,
    Qwen-Image's text length as the transformer receives it (after the template head is dropped and cut)."""
    seen: dict[str, int] = {}
    handles = []
    if family == "flux":
        encoders = (("clip", pipe.text_encoder, pipe.tokenizer), ("t5", pipe.text_encoder_2, pipe.tokenizer_2))
        for key, enc, tok in encoders:
            def hook(module, args, kwargs, key=key, pad=tok.pad_token_id):
                ids = kwargs.get("input_ids", args[0] if args else None)
                seen[key] = int((ids[0] != pad).sum())
            handles.append(enc.register_forward_pre_hook(hook, with_kwargs=True))
    else:
        def hook(module, args, kwargs):
            seen["qwen"] = kwargs["encoder_hidden_states"].shape[1]
        handles.append(pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        call(pipe, prompt, msl, steps=2 if family == "qwen-image" else 1)
    finally:
        for h in handles:
            h.remove()
    return seen


def words_for(pipe, family, key, msl, tokens_wanted):
    """A prompt of repeated words that `key`'s count makes exactly `tokens_wanted` tokens."""
    for n in range(1, 200):
        prompt = " ".join(["a"] * n)
        count = next(c for c in token_counts(pipe, family, prompt, msl) if c.encoder == key)
        if count.tokens == tokens_wanted:
            return prompt
    raise AssertionError(f"no prompt of {tokens_wanted} {key} tokens")


def test_every_family_has_its_encoders_in_the_table():
    from pipeline.families import names

    assert all(encoders_of(name) for name in names())
    assert [e.key for e in encoders_of("flux")] == ["clip", "t5"] and [e.key for e in encoders_of("qwen-image")] == ["qwen"]


@pytest.mark.parametrize("family,msl", [("flux", 32), ("qwen-image", 64)])  # tiny Qwen: ~46 template tokens stay
def test_counts_agree_with_what_the_pipeline_feeds_its_encoders(pipes, family, msl):
    pipe = pipes[family]
    for prompt in ("a cat", LONG):
        counts = token_counts(pipe, family, prompt, msl)
        fed = fed_tokens(pipe, family, prompt, msl)
        assert {c.encoder: c.tokens - c.dropped for c in counts} == fed, prompt
    cut = dropped_tokens(pipe, family, LONG, msl)
    assert cut and all(v > 0 for v in cut.values())
    assert dropped_tokens(pipe, family, "a cat", msl) == {}
    if family == "flux":  # the limits the pipeline uses: tokenizer_max_length (77 here) and max_sequence_length
        assert {c.encoder: c.limit for c in prompt_cuts(pipe, family, LONG, msl)} == {"clip": 77, "t5": 32}
        # the pipeline's own truncating call keeps exactly tokens - dropped
        kept = pipe.tokenizer_2(LONG, max_length=msl, truncation=True).input_ids
        assert len(kept) == len(pipe.tokenizer_2(LONG).input_ids) - cut["t5"] == msl


def test_a_prompt_exactly_at_the_limit_loses_nothing_and_one_more_token_is_one_dropped(pipes):
    pipe, msl = pipes["flux"], 24
    at, over = (words_for(pipe, "flux", "t5", msl, n) for n in (msl, msl + 1))
    assert dropped_tokens(pipe, "flux", at, msl) == {} and fed_tokens(pipe, "flux", at, msl)["t5"] == msl
    assert dropped_tokens(pipe, "flux", over, msl) == {"t5": 1} and fed_tokens(pipe, "flux", over, msl)["t5"] == msl


def test_truncated_rows_warn_once_per_row_and_name_row_line_and_limit(pipes):
    cfg = run_config(["model=tiny-flux", "sampler.max_sequence_length=32"])
    rows = [PromptRow(index=0, line=1, prompt="a cat", id="short"),
            PromptRow(index=1, line=2, prompt=LONG, id="long", num_images=2)]
    warned = []
    found = truncated_rows(pipes["flux"], "flux", list(expand(rows, cfg, {})), warn=warned.append)
    counts = {c.encoder: c for c in token_counts(pipes["flux"], "flux", LONG, 32)}
    assert found == {"long": {"clip": counts["clip"].dropped, "t5": counts["t5"].dropped}}
    assert len(warned) == 1
    clip = counts["clip"]
    assert warned[0].startswith(f"row 1 (line 2, id long): prompt is {clip.tokens} CLIP tokens; the last "
                                f"{clip.tokens - 77} are dropped (limit 77)")
    assert "T5 tokens" in warned[0] and "sampler.max_sequence_length" in warned[0]
    assert truncation_warning(12, 13, [clip]).startswith(f"row 12 (line 13): prompt is {clip.tokens} CLIP tokens")


class RecordingBar:
    def __init__(self):
        self.steps = []

    def step(self, done, total, label=""):
        self.steps.append((done, total))


def test_step_callback_reports_every_step_and_passes_on_to_another_callback(pipes):
    bar, seen = RecordingBar(), []

    def interrupt_check(pipe, i, t, kwargs):  # what someone else chains in: it sees every step, its return counts
        seen.append(i)
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else kwargs

    out = call(pipes["flux"], "a cat", 32, steps=3, callback_on_step_end=step_callback(bar, 3, also=interrupt_check))
    assert bar.steps == [(1, 3), (2, 3), (3, 3)] and seen == [0, 1, 2]
    assert not out.images.abs().sum()  # the chained callback's latents are the ones the pipeline kept
    bar = RecordingBar()
    call(pipes["qwen-image"], "a cat", 32, steps=2, callback_on_step_end=step_callback(bar))  # total from the pipe
    assert bar.steps == [(1, 2), (2, 2)]


def test_plain_step_lines_come_at_most_every_few_seconds(caplog):
    now = [0.0]
    bar = _Plain(4, step_every_s=5.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="pipeline"):
        for step in range(1, 13):
            now[0] += 1.0
            bar.step(step, 12)  # the last step leaves it to the batch's own line
        bar.advance(2, "a_1")
        now[0] += 4.0
        bar.step(1, 12)  # the next call: 4 s after the batch line, too soon
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:2] == ["[0/4]   step 5/12  1.00 s/step  ETA 7s", "[0/4]   step 10/12  1.00 s/step  ETA 2s"]
    assert lines[2].startswith("[2/4] a_1") and len(lines) == 3
    assert progress(1, "none").step(1, 2) is None  # silent mode takes steps too


def test_rich_bar_shows_the_steps_of_the_current_call_on_a_second_line():
    from rich.console import Console

    out = io.StringIO()
    with _Rich(3, console=Console(file=out, force_terminal=True, width=160)) as bar:
        bar.step(1, 4)
        bar.step(2, 4)
        steps = bar._progress.tasks[1]
        assert steps.visible and (steps.completed, steps.total) == (2, 4)
        bar.advance(1, "cat_0")
        bar.step(1, 8)  # the next call starts over
        assert (steps.completed, steps.total) == (1, 8)
        assert bar._progress.tasks[0].completed == 1
    assert "steps" in out.getvalue() and "images" in out.getvalue()


def test_item_log_lines_count_items_with_elapsed_time_and_eta():
    now, got = [0.0], []
    lines = ItemLog(3, emit=got.append, clock=lambda: now[0])
    for label in ("int4 plain", "int4 r32", "nvfp4 r32"):
        now[0] += 2.0
        lines(label)
    assert got == ["[1/3] int4 plain  (2.0 s, ETA 4 s)", "[2/3] int4 r32  (4.0 s, ETA 2 s)", "[3/3] nvfp4 r32  (6.0 s)"]


def test_calibration_logs_one_line_per_denoising_step(pipes, caplog):
    from pipeline.quantization.apply import calibrate

    cfg = run_config(["model=tiny-flux", "quantization.calibration.num_prompts=2", "quantization.calibration.steps=2",
                      "quantization.calibration.batch_size=1", "quantization.calibration.max_rows=16"])
    with caplog.at_level(logging.INFO, logger="pipeline"):
        stats = calibrate(pipes["flux"], cfg, 32, 32, 16)
    assert stats
    lines = [r.getMessage() for r in caplog.records if "calibration: prompt batch" in r.getMessage()]
    assert [line.split("  (")[0] for line in lines] == [
        "[1/4] calibration: prompt batch 1/2, step 1/2", "[2/4] calibration: prompt batch 1/2, step 2/2",
        "[3/4] calibration: prompt batch 2/2, step 1/2", "[4/4] calibration: prompt batch 2/2, step 2/2"]
    assert not pipes["flux"].transformer._forward_hooks  # the counting hook is gone


@pytest.fixture
def fast_quantize(monkeypatch):
    """The quantize job with calibration, quantization and the writer replaced by stand-ins (the real ones take
    a minute on two shared cores; test_engine_selection runs them): what is left is where files go."""
    import pipeline.quantization as quantization
    import pipeline.quantization.apply as apply
    import pipeline.quantization.checkpoint as checkpoint
    from pipeline.quantization.quantizer import LayerReport

    def quantize_(transformer, config, stats, on_layer=None):
        reports = [LayerReport(f"transformer_blocks.{i}.attn.to_qkv", (384, 128), 0.5, 0.05, True) for i in range(2)]
        for i, r in enumerate(reports):
            on_layer(i + 1, len(reports), r)
        return reports

    monkeypatch.setattr(apply, "calibrate", lambda *a, **k: {})
    monkeypatch.setattr(quantization, "quantize_", quantize_)
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda transformer, path, **kw: Path(path).write_bytes(b"x"))

    def run(output):
        from hydra import compose, initialize_config_dir

        from pipeline.cli import CONF_DIR
        from pipeline.config import to_run_config
        from pipeline.quantize_job import quantize_model_to_file

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = to_run_config(compose(config_name="quantize", overrides=["quantization=int4_r32"]))
        return quantize_model_to_file(cfg, Path(output))

    return run


def test_quantize_output_naming_a_safetensors_file_writes_that_file(tmp_path, fast_quantize, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline"):
        report = fast_quantize(tmp_path / "deep" / "er" / "x.safetensors")
    file = tmp_path / "deep/er/x.safetensors"
    assert file.is_file() and report["file"] == str(file)
    assert (tmp_path / "deep/er/x-report.json").is_file()
    messages = [r.getMessage() for r in caplog.records]
    warning = next(m for r, m in zip(caplog.records, messages) if r.levelno == logging.WARNING)
    assert "does not contain 'svdq-int4_r32'" in warning and "svdq-int4_r32-tiny-flux.safetensors" in warning
    assert any(m.startswith("[2/2] layer transformer_blocks.1.attn.to_qkv 384x128 rel.err 0.0500") for m in messages)


def test_quantize_output_well_named_file_or_folder(tmp_path, fast_quantize, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        fast_quantize(tmp_path / "svdq-int4_r32-mine.safetensors")
        assert not caplog.records  # a name runs can read precision and rank from: no warning
        fast_quantize(tmp_path / "folder")
    assert (tmp_path / "svdq-int4_r32-mine.safetensors").is_file()
    assert (tmp_path / "svdq-int4_r32-mine-report.json").is_file()
    assert (tmp_path / "folder/svdq-int4_r32-tiny-flux.safetensors").is_file()
    assert (tmp_path / "folder/svdq-int4_r32-tiny-flux-report.json").is_file()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        fast_quantize(tmp_path / "svdq-int4_r128-mine.safetensors")  # says another rank than it holds
    assert "does not contain 'svdq-int4_r32'" in caplog.records[-1].getMessage()
