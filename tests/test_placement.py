"""Memory placement: config checks, the auto decision table, byte counts from headers, per-block streaming.

The decision table uses the real models' published sizes (Hugging Face file listings, bytes = 1e9 per GB):
FLUX.1-dev: CLIP-L 0.246 GB, T5-XXL 9.52 GB (bf16), VAE 0.168 GB, transformer bf16 23.8 GB, Nunchaku int4 r32
6.77 GB; Qwen-Image: Qwen2.5-VL-7B 16.58 GB (bf16), VAE 0.254 GB, transformer bf16 40.86 GB, int4 r32 11.5 GB.
Blocks split the transformer by their parameter counts (D = 3072): a dual-stream block (FLUX double, every
Qwen-Image block) holds 36 D^2, a FLUX single block 15 D^2; the modules outside the blocks stay 16-bit.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hydra.errors import ConfigCompositionException
from safetensors.torch import save_file
from torch import nn

from conftest import compose, run_config
from pipeline.config.schema import Offload, TextEncoderDevice
from pipeline.errors import ConfigError
from pipeline.models.block_offload import stream_blocks, streamer_of, transformer_blocks
from pipeline.models.memory import (GiB, ModelDims, TransformerBytes, Workload, activation_bytes, component_bytes,
                                    estimate_memory, model_dims, tensor_bytes, transformer_bytes)
from pipeline.models.placement import (Placement, apply_placement, choose_placement, largest_blocks_that_fit,
                                       reference_placement, run_on_cpu, safety_margin, swapped_transformer)
from pipeline.models.tiny import build_tiny
from test_checkpoint import transformer_inputs

GB = 10**9
D = 3072
CUDA = torch.device("cuda")  # only named: choose_placement asks the fake free memory, never the driver
# (components, transformer bf16, transformer int4 r32, 16-bit bytes outside the blocks, per-block shares, dims,
# recommended size). Outside the blocks: the input embedders (FLUX: 64 latent + 4096 T5 + 256 timestep + 256
# guidance + 768 CLIP inputs; Qwen-Image: 64 + 3584 + 256) times D, plus the embedders' second linears and
# norm_out (FLUX 5 D^2, Qwen-Image 3 D^2).
REAL = {
    "flux.1-dev": ({"text_encoder": 0.246 * GB, "text_encoder_2": 9.52 * GB, "vae": 0.168 * GB}, 23.8 * GB,
                   6.77 * GB, ((64 + 4096 + 256 + 256 + 768 + 64) * D + 5 * D * D) * 2, [36] * 19 + [15] * 38,
                   ModelDims(D, (768, 4096), 128, 1024), (1024, 1024)),
    "qwen-image": ({"text_encoder": 16.58 * GB, "vae": 0.254 * GB}, 40.86 * GB, 11.5 * GB,
                   ((64 + 3584 + 256 + 64) * D + 3 * D * D) * 2, [36] * 60, ModelDims(D, (3584,), 96, 256),
                   (1328, 1328)),
}


def real_estimate(model: str, precision: str, batch_size: int = 1, vae_tiling: bool = False):
    components, bf16, int4, outside, shares, dims, (h, w) = REAL[model]
    total = int(int4 if precision == "int4" else bf16)
    blocks = tuple((total - outside) * s // sum(shares) for s in shares)
    transformer = TransformerBytes(outside + sum(blocks), blocks)
    return estimate_memory({k: int(v) for k, v in components.items()}, transformer, dims,
                           Workload(batch_size, h, w, 512, 2), vae_tiling)


def fake_free(gib: float):
    return lambda: (int(gib * GiB), int(gib * GiB))


def model_cfg(*overrides: str):
    return run_config(list(overrides)).model


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("overrides,key,fix", [
    (["model.offload=none", "model.blocks_on_gpu=0"], "model.blocks_on_gpu", "must be >= 1"),
    (["model.blocks_on_gpu=4"], "model.blocks_on_gpu", "set model.offload=none"),
    (["model.offload=sequential", "model.blocks_on_gpu=4"], "model.blocks_on_gpu", "set model.offload=none"),
    (["model.offload=model", "model.blocks_on_gpu=4"], "model.blocks_on_gpu", "model.blocks_on_gpu=null"),
    (["model.offload=none", "model.pin_memory=true"], "model.pin_memory", "needs model.blocks_on_gpu=N"),
    (["model.offload=model", "model.text_encoder_device=cpu"], "model.text_encoder_device",
     "set model.text_encoder_device=auto"),
])
def test_contradicting_placement_settings_name_the_key_and_the_fix(overrides, key, fix):
    with pytest.raises(ConfigError) as e:
        run_config(overrides)
    assert any(k == key and fix in msg for k, msg in e.value.problems), e.value.problems


def test_placement_settings_reach_the_typed_config():
    m = model_cfg("model.offload=none", "model.blocks_on_gpu=2", "model.pin_memory=true",
                  "model.text_encoder_device=cpu", "model.vae_tiling=true")
    assert (m.offload, m.blocks_on_gpu, m.pin_memory, m.text_encoder_device, m.vae_tiling) == (
        Offload.none, 2, True, TextEncoderDevice.cpu, True)
    assert model_cfg().offload == Offload.auto and model_cfg().blocks_on_gpu is None


def test_unknown_offload_mode_lists_the_allowed_ones():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["model.offload=disk"])
    assert all(mode in str(e.value.__cause__) for mode in ("none", "model", "sequential", "auto"))


# ------------------------------------------------------------------ the auto decision


# (model, precision, free GiB) -> (offload, blocks on the device, text encoders): batch 1 at the model's
# recommended size (FLUX.1 1024², Qwen-Image 1328²), 512 text tokens, bfloat16.
TABLE = [
    ("flux.1-dev", "int4", 12, ("model", None, "cuda")),
    ("flux.1-dev", "int4", 16, ("model", None, "cuda")),
    ("flux.1-dev", "int4", 24, ("none", None, "cuda")),
    ("flux.1-dev", "int4", 80, ("none", None, "cuda")),
    ("flux.1-dev", "bf16", 12, ("none", 11, "cpu")),
    ("flux.1-dev", "bf16", 16, ("none", 17, "cpu")),
    ("flux.1-dev", "bf16", 24, ("none", 44, "cpu")),
    ("flux.1-dev", "bf16", 80, ("none", None, "cuda")),
    ("qwen-image", "int4", 12, ("none", 42, "cpu")),
    ("qwen-image", "int4", 16, ("none", None, "cpu")),
    ("qwen-image", "int4", 24, ("model", None, "cuda")),
    ("qwen-image", "int4", 80, ("none", None, "cuda")),
    ("qwen-image", "bf16", 12, ("none", 10, "cpu")),
    ("qwen-image", "bf16", 16, ("none", 16, "cpu")),
    ("qwen-image", "bf16", 24, ("none", 27, "cpu")),
    ("qwen-image", "bf16", 80, ("none", None, "cuda")),
]


@pytest.mark.parametrize("model,precision,gib,expected", TABLE)
def test_auto_picks_the_least_offload_that_fits(model, precision, gib, expected):
    est = real_estimate(model, precision)
    p = choose_placement(model_cfg(), est, CUDA, fake_free(gib))
    assert (p.offload, p.blocks_on_gpu, p.text_encoder_device) == expected
    budget = int(gib * GiB) - safety_margin(int(gib * GiB))
    assert p.fits and p.need_bytes <= budget
    if p.blocks_on_gpu is not None:  # the largest N that fits: one more block would not
        assert est.need("none", p.blocks_on_gpu + 1, text_on_device=False) > budget
        assert est.need("model") > budget and est.need("none", text_on_device=False) > budget
    elif p.text_encoder_device == "cpu":  # model offload comes first: encoding on the CPU is the slower way out
        assert est.need("none") > budget and est.need("model") > budget
    elif p.offload == "model":
        assert est.need("none") > budget
    json.dumps(p.to_dict())  # what run.json records


def test_text_encoders_pinned_to_the_device_make_auto_use_model_offload():
    est = real_estimate("qwen-image", "int4")
    p = choose_placement(model_cfg("model.text_encoder_device=sampler"), est, CUDA, fake_free(24))
    assert (p.offload, p.blocks_on_gpu, p.text_encoder_device) == ("model", None, "cuda")
    assert "everything on the device" in p.reason and "does not fit" in p.reason


def test_when_nothing_fits_auto_says_so_and_uses_the_last_step():
    est = real_estimate("qwen-image", "bf16")
    p = choose_placement(model_cfg(), est, CUDA, fake_free(3))
    assert (p.offload, p.fits) == ("sequential", False) and "nothing fits" in p.reason
    p = choose_placement(model_cfg("model.text_encoder_device=cpu"), est, CUDA, fake_free(3))
    assert (p.offload, p.blocks_on_gpu, p.text_encoder_device, p.fits) == ("none", 1, "cpu", False)


def test_explicit_settings_are_kept_and_checked_against_the_estimate():
    est = real_estimate("flux.1-dev", "int4")
    p = choose_placement(model_cfg("model.offload=none"), est, CUDA, fake_free(12))
    assert (p.offload, p.text_encoder_device, p.fits) == ("none", "cuda", False) and "may not fit" in p.reason
    p = choose_placement(model_cfg("model.offload=none", "model.blocks_on_gpu=100"), est, CUDA, fake_free(24))
    assert p.blocks_on_gpu is None and "57 blocks" in p.reason


def test_batch_size_and_vae_tiling_change_the_decision():
    at_24 = [choose_placement(model_cfg(), real_estimate("flux.1-dev", "int4", 4, tiling), CUDA, fake_free(24))
             for tiling in (False, True)]
    assert [p.offload for p in at_24] == ["model", "none"]  # 4 images decoded at once vs one by one


def test_activation_estimate_scales_with_batch_and_shrinks_with_tiling():
    dims = REAL["qwen-image"][5]
    one = activation_bytes(dims, Workload(1, 1328, 1328, 512, 2), False)
    four = activation_bytes(dims, Workload(4, 1328, 1328, 512, 2), False)
    assert four == tuple(4 * x for x in one)
    text, denoise, vae = activation_bytes(dims, Workload(4, 1328, 1328, 512, 2), True)
    assert (text, denoise) == four[:2] and vae * 1328 * 1328 == one[2] * 256 * 256  # one 256 px tile at a time


def test_on_the_cpu_offload_is_a_noop_that_says_so_once(caplog):
    cfg = run_config(["model.offload=none", "model.blocks_on_gpu=2", "model.pin_memory=true", "model.vae_tiling=true"])
    p = choose_placement(cfg.model, None, torch.device("cpu"))
    assert (p.offload, p.blocks_on_gpu, p.pin_memory, p.text_encoder_device) == ("none", None, False, "cpu")
    assert p.ignored == ["model.blocks_on_gpu=2", "model.pin_memory=true"] and "no effect" in p.reason
    pipe = build_tiny(cfg.model)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        apply_placement(pipe, p, torch.device("cpu"), torch.float32)
    assert [r.getMessage().count("no effect") for r in caplog.records] == [1]
    assert streamer_of(pipe.transformer) is None and pipe.vae.use_tiling and pipe.vae.use_slicing


# ------------------------------------------------------------------ bytes from headers


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    pipe = build_tiny(run_config(["model=tiny-flux"]).model)
    folder = tmp_path_factory.mktemp("tiny-flux")
    pipe.save_pretrained(folder)
    return pipe, folder


def stored_bytes(module) -> int:
    """Bytes of the tensors a state dict holds, each storage once (tied weights are saved once)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in module.state_dict().values()}
    return sum(seen.values())


def test_component_bytes_from_headers_equal_the_real_tensor_bytes(saved_tiny):
    pipe, folder = saved_tiny
    from_headers = component_bytes(folder)
    assert set(from_headers) == {"text_encoder", "text_encoder_2", "vae", "transformer"}
    assert from_headers == {name: stored_bytes(getattr(pipe, name)) for name in from_headers}
    as_bf16 = component_bytes(folder, torch.bfloat16)  # tiny weights are fp32: floating tensors count half
    assert as_bf16["transformer"] * 2 == from_headers["transformer"]
    assert model_dims(folder) == model_dims(pipe)


def test_transformer_bytes_per_block_match_the_module(saved_tiny):
    pipe, folder = saved_tiny
    from_file = transformer_bytes(folder / "transformer")
    assert from_file == transformer_bytes(pipe.transformer) and len(from_file.blocks) == 4
    assert tensor_bytes(folder / "transformer") == tensor_bytes(pipe.transformer)


def test_block_bytes_of_a_weight_file_follow_the_block_order(tmp_path):
    path = tmp_path / "svdq-int4_r32-x.safetensors"
    save_file({"single_transformer_blocks.0.qweight": torch.zeros(8, 4, dtype=torch.int8),
               "transformer_blocks.1.wscales": torch.zeros(3, dtype=torch.bfloat16),
               "transformer_blocks.0.wscales": torch.zeros(5, dtype=torch.bfloat16),
               "x_embedder.weight": torch.zeros(7, dtype=torch.float32)}, str(path))
    assert transformer_bytes(path) == TransformerBytes(32 + 6 + 10 + 28, (10, 6, 32))
    assert transformer_bytes(path, torch.bfloat16) == TransformerBytes(32 + 6 + 10 + 14, (10, 6, 32))


# ------------------------------------------------------------------ per-block streaming


def forward(transformer, model):
    with torch.inference_mode():  # as the runner calls the pipeline
        return transformer(**transformer_inputs(model)).sample


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-qwen-image"])
def test_streamed_blocks_give_bit_identical_outputs_and_bounded_residency(model):
    transformer = build_tiny(run_config([f"model={model}"]).model).transformer
    reference = forward(transformer, model)
    n = len(transformer_blocks(transformer))
    for resident in (1, n):
        streamer = stream_blocks(transformer, torch.device("cpu"), resident)
        seen = []
        for i, block in enumerate(transformer_blocks(transformer)):  # registered after the streamer's hooks
            block.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, streamer.on_device())))
        outputs = [forward(transformer, model) for _ in range(2)]
        assert all(torch.equal(o, reference) for o in outputs)
        assert streamer.loads == 2 * (n - resident)  # each streamed block copied in once per forward
        assert all(i in on and len(on) <= resident + 2 for i, on in seen)
        assert streamer.on_device() == list(range(resident))  # streamed blocks left after running
        streamer.remove()
        for block in transformer_blocks(transformer):
            block._forward_pre_hooks.clear()  # the observers above
        assert streamer_of(transformer) is None
        assert not any(b._forward_hooks for b in transformer_blocks(transformer))
    assert torch.equal(forward(transformer, model), reference)


def test_streamed_blocks_are_device_copies_only_while_needed():
    transformer = build_tiny(run_config(["model=tiny-flux"]).model).transformer
    streamer = stream_blocks(transformer, torch.device("cpu"), 1)
    last = transformer_blocks(transformer)[-1]
    host = last.norm.linear.weight.data_ptr()
    during = []
    last.register_forward_pre_hook(lambda m, a: during.append(m.norm.linear.weight.data_ptr()))
    forward(transformer, "tiny-flux")
    assert during[0] != host and last.norm.linear.weight.data_ptr() == host
    streamer.park()
    assert streamer.on_device() == [0]
    streamer.unpark()
    with pytest.raises(ValueError, match="already streams"):
        stream_blocks(transformer, torch.device("cpu"), 2)


def test_text_encoder_hooks_keep_encode_prompt_working():
    pipe = build_tiny(run_config(["model=tiny-qwen-image"]).model)
    plain = pipe.encode_prompt(["a cat", "a red house"], device=torch.device("cpu"), max_sequence_length=32)
    handles = run_on_cpu(pipe.text_encoder)
    calls = []
    pipe.text_encoder.register_forward_hook(lambda m, a, o: calls.append(type(o).__name__))
    hooked = pipe.encode_prompt(["a cat", "a red house"], device=torch.device("cpu"), max_sequence_length=32)
    assert calls == ["BaseModelOutputWithPast"] or len(calls) == 1
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(plain, hooked))
    for h in handles:
        h.remove()
    assert not pipe.text_encoder._forward_pre_hooks


# ------------------------------------------------------------------ the reference transformer


def test_reference_placement_streams_only_when_the_whole_does_not_fit():
    ref = TransformerBytes(1000 + 10 * 100, (100,) * 10)
    base = choose_placement(model_cfg(), None, torch.device("cpu"))
    assert reference_placement(ref, base, GiB + 2000).blocks_on_gpu is None
    streamed = reference_placement(ref, base, GiB + 1000 + 4 * 100 + 2 * 100)
    assert (streamed.blocks_on_gpu, streamed.fits) == (4, True)
    assert largest_blocks_that_fit(streamed.estimate, 1000 + 4 * 100 + 2 * 100, False) == 4


def test_swapped_transformer_runs_the_other_and_restores_everything():
    import copy

    pipe = build_tiny(run_config(["model=tiny-flux", "model.tiny.num_single_layers=6"]).model)
    other = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    mine, theirs = forward(pipe.transformer, "tiny-flux"), forward(other, "tiny-flux")
    current = pipe.transformer
    current_streamer = stream_blocks(current, torch.device("cpu"), 1)
    placement = Placement("none", 1, False, False, "cpu", "cpu", "test")
    sizes = transformer_bytes(other)
    free = GiB + sizes.outside_blocks + sum(sizes.blocks[:3]) + 2 * max(sizes.blocks[3:])  # 3 of 8 blocks fit
    with swapped_transformer(pipe, other, placement, torch.device("cpu"), lambda: (free, free)) as ref:
        assert pipe.transformer is other and ref.blocks_on_gpu == 3
        assert streamer_of(other).resident == 3 and current_streamer.on_device() == [0]
        assert torch.equal(forward(pipe.transformer, "tiny-flux"), theirs)
    assert pipe.transformer is current and streamer_of(other) is None and streamer_of(current) is current_streamer
    assert all(not b._forward_pre_hooks for b in transformer_blocks(other))
    assert torch.equal(forward(pipe.transformer, "tiny-flux"), mine)
    with pytest.raises(RuntimeError, match="boom"):
        with swapped_transformer(pipe, other, placement, torch.device("cpu"), lambda: (free, free)):
            raise RuntimeError("boom")
    assert pipe.transformer is current and streamer_of(other) is None


def test_streaming_casts_like_module_to_and_quantized_layers_keep_their_dtypes():
    from pipeline.quantization.layers import KeepsDtypes

    class Kept(KeepsDtypes):
        def __init__(self):
            super().__init__()
            self.register_buffer("bias", torch.ones(4))  # fp32, as a quantized layer's bias

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.kept = nn.Linear(4, 4), Kept()

        def forward(self, x):
            return self.linear(x) + self.kept.bias.to(x.dtype)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_in, self.transformer_blocks = nn.Linear(4, 4), nn.ModuleList([Block(), Block(), Block()])

        def forward(self, x):
            x = self.proj_in(x)
            for block in self.transformer_blocks:
                x = block(x)
            return x

    toy = Toy()
    expected = toy.to(torch.bfloat16)(torch.ones(1, 4, dtype=torch.bfloat16))
    toy.float()
    streamer = stream_blocks(toy, torch.device("cpu"), 1, dtype=torch.bfloat16)
    assert torch.equal(toy(torch.ones(1, 4, dtype=torch.bfloat16)), expected) and streamer.loads == 2
    assert {b.linear.weight.dtype for b in toy.transformer_blocks} == {torch.bfloat16}
    assert {b.kept.bias.dtype for b in toy.transformer_blocks} == {torch.float32}


def test_swap_under_model_offload_rehooks_the_reference_and_then_the_original():
    """diffusers' model offload with the CPU as its execution device: the same hooks as on a GPU."""
    import copy

    pipe = build_tiny(run_config(["model=tiny-flux"]).model)
    pipe.set_progress_bar_config(disable=True)
    other = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)

    def render():
        with torch.inference_mode():
            return pipe(prompt=["a cat"], num_inference_steps=1, height=32, width=32, max_sequence_length=32,
                        generator=[torch.Generator("cpu").manual_seed(0)], output_type="pt").images

    current = pipe.transformer
    mine = render()
    pipe.transformer = other
    theirs = render()
    pipe.transformer = current
    placement = Placement("model", None, False, False, "cpu", "cpu", "test")
    apply_placement(pipe, placement, torch.device("cpu"))
    with swapped_transformer(pipe, other, placement, torch.device("cpu"), fake_free(100)) as ref:
        assert ref.offload == "model" and hasattr(other, "_hf_hook") and not hasattr(current, "_hf_hook")
        assert torch.equal(render(), theirs)
    assert pipe.transformer is current and hasattr(current, "_hf_hook") and not hasattr(other, "_hf_hook")
    assert not torch.equal(mine, theirs) and torch.equal(render(), mine)
