"""The kernel self-check (pipeline/kernels/selfcheck.py): every configuration of tiny INT4 models passes and is
the set their forwards use; a kernel made wrong on purpose fails its configuration alone, which then runs the
reference while the others keep their kernels; strict raises; where no kernel runs nothing runs; results are
cached. On CPU through Triton's interpreter, on a GPU for real."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from pipeline.errors import PipelineError  # noqa: E402
from pipeline.kernels import dispatch, ops, selfcheck  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# the interpreter rounds to bf16 by truncation (test_kernels.py): bf16 is checked on a GPU only
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
OPS = ("w4a4_linear", "w4a4_linear_joint", "w4a4_gelu_quant", "w4a4_gemm", "awq_w4a16_gemv", "qk_norm_rope",
       "adaln_modulate")
ADALN = dispatch.adaln_config(torch.float32)


@pytest.fixture(scope="module")
def transformers():
    """(model, dtype) -> a quantized tiny INT4 transformer on DEVICE, built once; the self-check starts afresh."""
    from test_checkpoint import quantized_pipe

    built = {}
    selfcheck.forget()

    def get(model, dtype=torch.float32):
        if (model, dtype) not in built:
            with pytest.MonkeyPatch.context() as env:  # calibration and quantization on the reference: seconds
                env.setenv("SVDQ_KERNELS", "reference")
                built[(model, dtype)] = quantized_pipe(model, "int4").transformer.to(DEVICE, dtype)
        return built[(model, dtype)]

    yield get
    selfcheck.forget()


@pytest.fixture
def kernels(monkeypatch):
    """The kernels run (the interpreter on CPU). Yields fresh(config): check that configuration afresh in this
    test (a kernel it breaks), and again in the next."""
    if DEVICE.type == "cpu":
        monkeypatch.setenv("SVDQ_KERNELS", "triton")
    broken = []

    def fresh(config):
        selfcheck.forget(config)
        broken.append(config)

    yield fresh
    for config in broken:
        selfcheck.forget(config)


def count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Calls of each kernel op (pipeline/kernels/ops.py) from now on, counted around what is installed now."""
    calls = dict.fromkeys(OPS, 0)
    for name in OPS:
        real = getattr(ops, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(ops, name, counted)
    return calls


def queried_configs(monkeypatch) -> set:
    """The configurations the call sites ask dispatch about from now on."""
    seen = set()
    real = dispatch.is_disabled

    def record(device, config):
        if config is not None:
            seen.add(config)
        return real(device, config)

    monkeypatch.setattr(dispatch, "is_disabled", record)
    return seen


def forward(transformer, model: str) -> torch.Tensor:
    from test_checkpoint import transformer_inputs

    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in transformer_inputs(model).items()}
    with torch.no_grad():
        return transformer(**kw).sample


def broken_adaln(monkeypatch):
    """The AdaLN kernel made wrong on purpose: its output off by 0.01."""
    real = ops.adaln_modulate
    monkeypatch.setattr(ops, "adaln_modulate", lambda x, scale, shift, eps: real(x, scale, shift, eps) + 0.01)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", ["tiny-flux", "tiny-qwen-image"])
def test_every_configuration_of_tiny_int4_models_passes(transformers, kernels, model, dtype):
    transformer = transformers(model, dtype)
    record = selfcheck.self_check(transformer, DEVICE, dtype, strict=True)
    entries = record["configurations"]
    assert record["status"] == "passed" and json.loads(json.dumps(record)) == record
    assert [e["name"] for e in entries] == [selfcheck.config_name(c.config) for c in selfcheck.plan(transformer, dtype)]
    for e in entries:
        assert e["status"] == "passed" and 0 <= e["max_error"] <= e["tolerance"], e
        assert e["tolerance"] == selfcheck.TOLERANCE[dtype] or e["name"].startswith("gelu_mlp"), e  # its steps' own
    assert f"{len(entries)} configurations, {len(entries)} passed, 0 failed" in record["summary"]


def test_the_planned_configurations_are_those_the_forward_uses(transformers, kernels, monkeypatch):
    """FLUX's (Qwen-Image's are compared in the fallback test's forward)."""
    transformer = transformers("tiny-flux")
    seen = queried_configs(monkeypatch)
    forward(transformer, "tiny-flux")
    planned = [check.config for check in selfcheck.plan(transformer, torch.float32)]
    assert sorted(map(selfcheck.config_name, planned)) == sorted(map(selfcheck.config_name, seen))
    assert len(planned) == len(seen) > 1


def test_a_wrong_kernel_fails_its_configuration_alone_which_then_runs_the_reference(transformers, kernels,
                                                                                     monkeypatch, caplog):
    model = "tiny-qwen-image"
    transformer = transformers(model)
    kernels(ADALN)
    broken_adaln(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        record = selfcheck.self_check(transformer, DEVICE, torch.float32, strict=False)
    entries = {e["name"]: e for e in record["configurations"]}
    name = selfcheck.config_name(ADALN)
    assert [n for n, e in entries.items() if e["status"] == "failed"] == [name]
    assert entries[name]["max_error"] > 10 * entries[name]["tolerance"] and not entries[name]["cached"]
    assert len(entries) > 1 and all(e["status"] == "passed" for n, e in entries.items() if n != name)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "pipeline"]
    assert len(warnings) == 1 and name in warnings[0] and "runs the PyTorch reference from now on" in warnings[0]
    assert record["status"] == "failed" and f"{name} failed" in record["summary"]

    counted, seen = count_kernel_calls(monkeypatch), queried_configs(monkeypatch)
    after = forward(transformer, model)
    calls = dict(counted)  # the counters below wrap these ones
    assert sorted(entries) == sorted(map(selfcheck.config_name, seen))  # the plan is what the forward uses
    # what the run should give: the same kernels, with AdaLN's norm + modulation as diffusers' ops (the reference)
    monkeypatch.setattr(ops, "adaln_modulate", lambda x, scale, shift, eps: (
        F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]))
    dispatch.enable(ADALN)
    expected_calls = count_kernel_calls(monkeypatch)
    expected = forward(transformer, model)
    assert calls["adaln_modulate"] == 0
    assert expected_calls["adaln_modulate"] == 4 * len(transformer.transformer_blocks)  # each block's 4 norms
    assert {op: n for op, n in calls.items() if op != "adaln_modulate"} == {
        op: n for op, n in expected_calls.items() if op != "adaln_modulate"}
    assert all(calls[op] > 0 for op in ("w4a4_linear", "w4a4_linear_joint", "w4a4_gelu_quant", "w4a4_gemm",
                                        "awq_w4a16_gemv", "qk_norm_rope"))
    if DEVICE.type == "cpu":
        assert torch.equal(after, expected)
    else:  # the GELU-quantize epilogue's low-rank sums are atomic: their order varies between runs on a GPU
        torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)


def test_strict_raises_naming_the_configuration_its_error_and_the_fix(transformers, kernels, monkeypatch):
    norm1 = transformers("tiny-flux").transformer_blocks[0].norm1  # AdaLN-Zero: the AWQ GEMV and the AdaLN kernel
    kernels(ADALN)
    broken_adaln(monkeypatch)
    with pytest.raises(selfcheck.KernelCheckError) as raised:
        selfcheck.self_check(norm1, DEVICE, torch.float32, strict=True)
    message, record = str(raised.value), raised.value.record
    assert isinstance(raised.value, PipelineError) and record["status"] == "failed"
    entry = next(e for e in record["configurations"] if e["name"] == selfcheck.config_name(ADALN))
    assert f"adaln_modulate[float32]: output: error {entry['max_error']:.3g} > tolerance {entry['tolerance']:.3g}" in (
        message) and entry["tolerance"] == selfcheck.TOLERANCE[torch.float32]
    assert "without quantization.strict=true" in message and "SVDQ_KERNELS=reference" in message


def test_a_kernel_that_does_not_launch_fails_and_its_layers_run_the_reference(transformers, kernels, monkeypatch):
    norm1 = transformers("tiny-flux").transformer_blocks[0].norm1
    awq = dispatch.awq_config(norm1.linear, torch.float32)
    kernels(awq)

    def no_launch(*args):
        raise RuntimeError("no kernel image is available for execution on the device\nmore")

    monkeypatch.setattr(ops, "awq_w4a16_gemv", no_launch)
    record = selfcheck.self_check(norm1, DEVICE, torch.float32, strict=False)
    entry = next(e for e in record["configurations"] if e["name"] == selfcheck.config_name(awq))
    assert entry["status"] == "failed" and entry["max_error"] is None
    assert entry["reason"] == "RuntimeError: no kernel image is available for execution on the device"
    x = torch.randn(2, norm1.linear.in_features, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    assert torch.equal(norm1.linear(x), norm1.linear.reference_forward(x))  # no_launch is not called


@pytest.mark.parametrize("forced", [None, "reference"])
def test_where_no_kernel_runs_it_returns_skipped_without_running_anything(transformers, monkeypatch, forced):
    transformer = transformers("tiny-flux")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("SVDQ_KERNELS", raising=False)
    if forced:
        monkeypatch.setenv("SVDQ_KERNELS", forced)
    calls = count_kernel_calls(monkeypatch)
    record = selfcheck.self_check(transformer, torch.device("cpu"), torch.float32, strict=True)
    assert record["status"] == "skipped" and record["configurations"] == [] and sum(calls.values()) == 0
    assert ("SVDQ_KERNELS=reference" if forced else "the kernels run on CUDA GPUs") in record["reason"]
    assert record["summary"] == f"kernel self-check skipped: {record['reason']}"


def test_results_are_cached_per_device_and_configuration(transformers, kernels, monkeypatch):
    norm1 = transformers("tiny-flux").transformer_blocks[0].norm1
    configs = [check.config for check in selfcheck.plan(norm1, torch.float32)]
    assert sorted(map(selfcheck.config_name, configs)) == ["adaln_modulate[float32]", "awq_gemv[bias, float32]"]
    for config in configs:
        kernels(config)
    first = selfcheck.self_check(norm1, DEVICE, torch.float32, strict=True)
    calls = count_kernel_calls(monkeypatch)
    second = selfcheck.self_check(norm1, DEVICE, torch.float32, strict=True)
    assert sum(calls.values()) == 0
    assert [e["cached"] for e in first["configurations"]] == [False, False]
    assert [dict(e, cached=False) for e in second["configurations"]] == first["configurations"]
    assert all(e["cached"] for e in second["configurations"])


def test_a_model_on_another_device_is_refused(kernels):
    with pytest.raises(ValueError, match="the model is on meta: keep it in host memory or on cpu"):
        selfcheck.self_check(torch.nn.Linear(2, 2, device="meta"), torch.device("cpu"), torch.float32, strict=False)


def test_a_check_lends_its_layers_to_the_device_and_returns_them(transformers):
    """A model waiting in host memory (offloaded, or placed after its check) lends each check just the modules it
    calls, and takes them back; a module already on the device stays."""
    layer = transformers("tiny-flux").transformer_blocks[0].norm1.linear
    moves = []
    layer.to = lambda device: moves.append(str(device)) or layer  # records instead of moving
    try:
        with selfcheck._on(torch.device("cuda", 3), (layer,)):
            moves.append("check")
        with selfcheck._on(torch.device("cpu"), (layer,)):
            moves.append("check")
    finally:
        del layer.to
    assert moves == ["cuda:3", "check", "cpu", "check"]
