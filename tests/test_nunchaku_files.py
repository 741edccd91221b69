"""Real Nunchaku files, checked against the source of truth at full size on CPU.

The tensor lists in tests/data/nunchaku_tensors/ were derived from Nunchaku's own loader classes and DeepCompressor's
own writer (tests/data/make_nunchaku_tensor_lists.py); golden_awq.safetensors was packed by DeepCompressor's own
AWQ converter (tests/data/make_awq_golden.py). Here: the layout our loader reads and our writer writes equals those
lists for FLUX.1-dev, FLUX.1-schnell and Qwen-Image at int4 r32/r128 and nvfp4 r32; the AWQ modulation packs and
unpacks bit for bit as DeepCompressor does; a sparse full-size FLUX.1-dev file loads into a meta-built transformer
and runs one forward.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.models.quantized import meta_transformer
from pipeline.quantization import numerics as nx
from pipeline.quantization import packing as pk
from pipeline.quantization.checkpoint import _pack_awq, _read_awq, file_layout, load_checkpoint
from pipeline.quantization.file_info import inspect_checkpoint, quantization_config
from pipeline.quantization.layers import AWQW4A16Linear, SVDQW4A4Linear
from pipeline.quantization.synthetic import write_sparse_checkpoint
from pipeline.quantization.targets import Target
from pipeline.quantization.transform import modulation_fold

DATA = Path(__file__).with_name("data")
CONFIGS = Path(__file__).resolve().parents[1] / "pipeline/models/configs"
MODELS = {"flux.1-dev": "flux", "flux.1-schnell": "flux", "qwen-image": "qwen-image"}


def meta(model: str):
    return meta_transformer(MODELS[model], json.loads((CONFIGS / f"{model}.json").read_text()), torch.bfloat16)


def nunchaku_list(model: str, precision: str, rank: int) -> dict[str, tuple[list[int], str]]:
    rows = json.loads(gzip.decompress((DATA / f"nunchaku_tensors/{model}_{precision}_r{rank}.json.gz").read_bytes()))
    return {name: (shape, dtype) for name, shape, dtype in rows}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("precision,rank", [("int4", 32), ("int4", 128), ("nvfp4", 32)])
def test_file_layout_is_the_tensor_list_nunchaku_defines(model, precision, rank):
    ours = {k: (list(shape), str(dtype)) for k, (shape, dtype) in
            file_layout(meta(model), precision=precision, rank=rank).items()}
    theirs = nunchaku_list(model, precision, rank)
    if (model, precision) != ("qwen-image", "nvfp4"):
        assert ours == theirs  # every name, shape and dtype (FLUX: as DeepCompressor writes and Nunchaku reads it)
        return
    # Qwen-Image NVFP4 comes from Nunchaku's model alone (DeepCompressor has no Qwen-Image writer): its state dict
    # holds wcscales on every layer, which its loader fills with ones where a file has none, and it takes a
    # file's wtscale instead (patch_scale_key). We write DeepCompressor's FLUX pattern: wcscales on the fused
    # q/k/v layers, a (1,) wtscale on the others.
    scales = {k for k in ours if k.endswith(".wtscale")}
    assert {k: v for k, v in ours.items() if k not in scales}.items() <= theirs.items()
    assert set(theirs) - set(ours) == {k.removesuffix(".wtscale") + ".wcscales" for k in scales}
    assert all(ours[k] == ([1], "torch.bfloat16") for k in scales)


def test_published_sizes_follow_from_the_layout():
    """FLUX.1-dev int4 r32: 2604 tensors, 6.77 GB; Qwen-Image int4 r32: 4093 tensors, 11.5 GB (the public files)."""
    for model, count, gb in (("flux.1-dev", 2604, 6.77), ("qwen-image", 4093, 11.52)):
        layout = file_layout(meta(model), precision="int4", rank=32)
        size = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for s, d in layout.values())
        assert len(layout) == count and round(size / 1e9, 2) == gb


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(DATA / "golden_awq.safetensors"), "pt") as f:
        cases = json.loads(f.metadata()["cases"])
        return cases, {k: f.get_tensor(k) for k in f.keys()}


def awq_case(cases, t, name):
    info = cases[name]
    splits = info["adanorm_splits"]
    target = Target(name, (name,), kind="awq", mod_chunks=splits,
                    scale_chunks={6: (1, 4), 3: (1,), 1: ()}[splits])
    codes, scales, bias = t[f"{name}.codes"], t[f"{name}.scales"], t[f"{name}.bias"]
    layer = AWQW4A16Linear(qweight=codes, wscales=scales, wzeros=(-7 * scales.float()).to(torch.bfloat16),
                           bias=bias.float(), ckpt_name=name)
    return target, layer, codes, scales


@pytest.mark.parametrize("name", ["adanorm_zero", "adanorm_single", "adanorm_single_k128", "plain_k1024"])
def test_awq_modulation_packs_as_deepcompressor_does(golden, name):
    """Row interleave by modulation chunk, TinyChat's nibble order, w = q·s - 7s, and the AdaLN "+1" folded into
    the scale chunks' bias: bit for bit DeepCompressor's output (its scales padded to whole packs of groups)."""
    cases, t = golden
    target, layer, codes, scales = awq_case(cases, t, name)
    groups = codes.shape[1] // 64
    ours = _pack_awq(name, layer, target, torch.bfloat16, modulation_fold(target, codes.shape[0]))
    theirs = {f: t[f"{name}.dc.{f}"] for f in ("qweight", "wscales", "wzeros", "bias")}
    assert torch.equal(ours[f"{name}.qweight"], theirs["qweight"])
    assert torch.equal(ours[f"{name}.bias"], theirs["bias"])
    for f in ("wscales", "wzeros"):
        assert torch.equal(ours[f"{name}.{f}"], theirs[f][:groups])
        assert not theirs[f][groups:].any()  # TinyChat's padding rows are zeros


@pytest.mark.parametrize("name", ["adanorm_zero", "adanorm_single_k128"])
def test_awq_modulation_reads_deepcompressors_output_back(golden, name):
    """Reading DeepCompressor's tensors (padded scale rows included) gives the layer it was given, bias unfolded."""
    cases, t = golden
    target, layer, codes, scales = awq_case(cases, t, name)

    class Reader:  # the file's four tensors under the layer's name
        def get(self, key, shape=None, what="", rows_at_least=False, staged=False):
            return t[key.replace(f"{name}.", f"{name}.dc.")]

    read = _read_awq(Reader(), target, codes.shape[0], codes.shape[1], "",
                     modulation_fold(target, codes.shape[0]))
    assert torch.equal(read.qweight, codes) and torch.equal(read.wscales, scales)
    assert torch.equal(read.wzeros, layer.wzeros) and torch.equal(read.bias, layer.bias)
    x = torch.randn(2, codes.shape[1], generator=torch.Generator().manual_seed(0))
    assert torch.equal(read(x), layer(x))


def test_the_old_awq_code_order_would_have_decoded_other_weights(golden):
    """The nibble order matters: the order the loader assumed before (each 32-bit word = 4 output rows x 2
    consecutive input channels) decodes DeepCompressor's words into other codes, so every modulation layer of a
    real file would have been wrong without an error."""
    cases, t = golden
    qweight = t["adanorm_zero.dc.qweight"]
    rows4, half = qweight.shape
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1)  # (N/4, K/2, 8)
    old = nibbles.reshape(rows4, half, 4, 2).permute(0, 2, 1, 3).reshape(rows4 * 4, half * 2).to(torch.uint8)
    right = pk.interleave_rows(t["adanorm_zero.codes"], 6)  # the file's row order
    assert torch.equal(nx.unpack_nibbles(pk.unpack_awq_nibbles(qweight), signed=False), right)
    assert (old != right).float().mean() > 0.8


def test_nvfp4_scales_may_sit_in_either_tensor(tmp_path):
    """wcscales (per channel) and wtscale (per tensor) multiply: a layer whose scale sits in one, the other, or
    both, and one whose file has neither (ones, 1), load to the same outputs; as in Nunchaku's patch_scale_key."""
    from pipeline.quantization.checkpoint import _read_svdq

    g = torch.Generator().manual_seed(0)
    n, k = 128, 128
    codes = torch.randint(0, 16, (n, k), generator=g).to(torch.uint8)
    scales = (torch.rand(n, k // 16, generator=g) * 4).to(torch.float8_e4m3fn)
    common = dict(wscales=scales, smooth=torch.ones(k, dtype=torch.bfloat16), proj_down=torch.zeros(k, 16,
                  dtype=torch.bfloat16), proj_up=torch.zeros(n, 16, dtype=torch.bfloat16),
                  bias=torch.zeros(n, dtype=torch.bfloat16))
    base = SVDQW4A4Linear(precision="nvfp4", qweight=codes, wtscale=torch.tensor(0.25),
                          wcscales=torch.ones(n, dtype=torch.bfloat16), **common)
    packed = {"qweight": pk.pack_weight_codes(codes), "wscales": pk.pack_wscales(scales, "nvfp4"),
              "smooth_factor": common["smooth"], "proj_down": pk.pack_proj_down(common["proj_down"]),
              "proj_up": pk.pack_proj_up(common["proj_up"]), "bias": common["bias"]}
    quarter = torch.full((n,), 0.25, dtype=torch.bfloat16)
    variants = {"wtscale": {"wtscale": torch.tensor([0.25], dtype=torch.bfloat16)},
                "wcscales": {"wcscales": pk.pack_vector(quarter)},
                "both": {"wtscale": torch.tensor([0.5]), "wcscales": pk.pack_vector(quarter * 2)}}
    x = torch.randn(3, k, generator=g)
    for extra in variants.values():
        tensors = {**packed, **extra}

        class Reader:
            def has(self, key):
                return key.rpartition(".")[2] in tensors

            def get(self, key, shape=None, what="", staged=False):
                return tensors[key.rpartition(".")[2]]

        layer = _read_svdq(Reader(), Target("l", ("l",)), n, k, 16, "nvfp4", 16, "", unsigned=False)
        assert torch.equal(layer(x), base(x))
    tensors = dict(packed)
    layer = _read_svdq(Reader(), Target("l", ("l",)), n, k, 16, "nvfp4", 16, "", unsigned=False)
    assert float(layer.wtscale) == 1.0 and torch.equal(layer.wcscales, torch.ones(n, dtype=torch.bfloat16))


@pytest.mark.slow
def test_a_full_size_flux_file_loads_into_a_meta_built_transformer_and_runs(tmp_path):
    """FLUX.1-dev int4 r32 at full size (6.77 GB, sparse: a few hundred MB of disk), legacy names as published,
    AWQ modulation: built on the meta device, filled from the file alone, a reference forward at 2x2 latents."""
    config = json.loads((CONFIGS / "flux.1-dev.json").read_text())
    transformer = meta("flux.1-dev")
    path = tmp_path / "svdq-int4_r32-flux.1-dev.safetensors"
    metadata = {"config": json.dumps(config), "model_class": "NunchakuFluxTransformer2dModel",
                "quantization_config": json.dumps(quantization_config("int4", 32))}
    size = write_sparse_checkpoint(path, file_layout(transformer, precision="int4", rank=32), metadata)
    assert size == path.stat().st_size > 6.7e9 and path.stat().st_blocks * 512 < 1e9
    info = inspect_checkpoint(path)
    assert (info.precision, info.rank, info.naming, info.family, info.tensors) == ("int4", 32, "legacy", "flux", 2604)
    names = load_checkpoint(transformer, path, info, act_unsigned=True)
    assert len(names) == 19 * 10 + 38 * 5  # double: 8 W4A4 + 2 AWQ; single: 4 W4A4 + 1 AWQ
    assert not any(t.is_meta for t in [*transformer.parameters(), *transformer.buffers()])
    assert isinstance(transformer.transformer_blocks[18].norm1_context.linear, AWQW4A16Linear)
    # every layer is loaded and checked above; the forward runs one block of each kind (the same code as the other
    # 18 and 37, at full width) plus the embedders and proj_out: 2 s instead of 17 on 2 cores
    transformer.transformer_blocks = transformer.transformer_blocks[-1:]
    transformer.single_transformer_blocks = transformer.single_transformer_blocks[:1]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = transformer(hidden_states=torch.randn(1, 4, 64, generator=g).bfloat16(),
                          encoder_hidden_states=torch.randn(1, 2, 4096, generator=g).bfloat16(),
                          pooled_projections=torch.randn(1, 768, generator=g).bfloat16(),
                          timestep=torch.tensor([0.5]).bfloat16(), guidance=torch.tensor([3.5]).bfloat16(),
                          img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(2, 3)).sample
    # every weight of the holes is zero: the blocks add nothing, proj_out's zero weight and bias give zeros
    assert out.shape == (1, 4, 64) and torch.isfinite(out.float()).all() and not out.any()
