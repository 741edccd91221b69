"""4-bit formats, the W4A4 product, and the SVDQuant evidence on a layer with outlier channels."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from pipeline.quantization import numerics as nx
from pipeline.quantization import packing as pk
from pipeline.quantization.layers import SVDQW4A4Linear
from pipeline.quantization.quantizer import ActStats, svdquant_linear

GOLDEN = ROOT / "tests/data/golden_int4.safetensors"


def test_int4_weight_codes_scales_and_rounding():
    w = torch.tensor([[0.7, -0.7, 0.35, 0.05] * 16])
    codes, scales = nx.quantize_int4_weight(w, torch.float32)
    assert scales.shape == (1, 1) and scales.item() == pytest.approx(0.1)
    assert codes[0, :4].tolist() == [7, -7, 4, 0]  # 3.5 rounds half to even -> 4; 0.5 -> 0
    assert codes.min() >= -8 and codes.max() <= 7


def test_int4_activations_signed_unsigned_and_zero_groups():
    x = torch.cat([torch.linspace(-3, 3, 64), torch.zeros(64)]).reshape(1, 128)
    codes, scales = nx.quantize_int4_act(x)
    assert scales[0].tolist() == pytest.approx([3 / 7, 0.0])
    assert codes[0, 0] == -7 and codes[0, 63] == 7 and (codes[0, 64:] == 0).all()
    u_codes, u_scales = nx.quantize_int4_act(torch.linspace(0, 3, 64).reshape(1, 64), unsigned=True)
    assert u_scales.item() == pytest.approx(0.2) and u_codes.min() == 0 and u_codes.max() == 15


def test_e2m1_values_ties_to_even_and_saturation():
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert torch.equal(nx.e2m1_decode(nx.e2m1_encode(grid)), grid)
    assert torch.equal(nx.e2m1_decode(nx.e2m1_encode(-grid[1:])), -grid[1:])
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert nx.e2m1_decode(nx.e2m1_encode(ties)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert nx.e2m1_decode(nx.e2m1_encode(torch.tensor([7.0, -100.0]))).tolist() == [6.0, -6.0]


def test_nvfp4_scales_are_fp8_and_dequantization_is_close():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    codes, scales, tscale = nx.quantize_nvfp4_weight(w)
    assert scales.dtype == torch.float8_e4m3fn and scales.shape == (32, 4) and codes.dtype == torch.uint8
    rel = (nx.dequantize(codes, scales, "nvfp4", tscale) - w).norm() / w.norm()
    assert 0 < rel < 0.15
    a_codes, a_scales = nx.quantize_nvfp4_act(w)
    assert float(a_scales.float().max()) <= nx.FP8_MAX


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_w4a4_product_equals_dequantized_matmul(precision):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(8, 128, generator=g), torch.randn(16, 128, generator=g)
    a_codes, a_scales = nx.quantize_act(x, precision)
    w_codes, w_scales, tscale = nx.quantize_weight(w, precision)
    got = nx.w4a4_matmul(a_codes, a_scales, w_codes, w_scales, precision)
    expected = nx.dequantize(a_codes, a_scales, precision).double() @ nx.dequantize(w_codes, w_scales, precision).double().T
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_golden_vectors_pack_and_forward():
    """tests/data/make_golden.py derives these element by element from the layout spec."""
    g = load_file(str(GOLDEN))
    assert torch.equal(pk.pack_weight_codes(g["codes"]), g["packed.qweight"])
    assert torch.equal(pk.pack_wscales(g["scales"], "int4"), g["packed.wscales"])
    assert torch.equal(pk.pack_vector(g["smooth"]), g["packed.smooth_factor"])
    assert torch.equal(pk.pack_vector(g["bias"]), g["packed.bias"])
    assert torch.equal(pk.pack_proj_down(g["proj_down"]), g["packed.proj_down"])
    assert torch.equal(pk.pack_proj_up(g["proj_up"]), g["packed.proj_up"])
    layer = SVDQW4A4Linear(precision="int4", qweight=g["codes"], wscales=g["scales"], smooth=g["smooth"],
                           proj_down=g["proj_down"], proj_up=g["proj_up"], bias=g["bias"])
    y = layer(g["x"]).double()
    assert ((y - g["y"]).abs().max() / g["y"].abs().max()) < 1e-6


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_every_packing_round_trips_exactly(precision):
    g = torch.Generator().manual_seed(2)
    n, k, r = 256, 384, 32
    lo, hi = (-8, 8) if precision == "int4" else (0, 16)
    codes = torch.randint(lo, hi, (n, k), generator=g).to(torch.int8 if precision == "int4" else torch.uint8)
    assert torch.equal(pk.unpack_weight_codes(pk.pack_weight_codes(codes), precision == "int4"), codes)
    groups = k // nx.group_size(precision)
    scales = torch.rand(n, groups, generator=g).to(torch.bfloat16 if precision == "int4" else torch.float8_e4m3fn)
    back = pk.unpack_wscales(pk.pack_wscales(scales, precision), precision)
    assert torch.equal(back.view(torch.uint8) if precision == "nvfp4" else back, scales.view(torch.uint8) if precision == "nvfp4" else scales)
    v, down, up = torch.randn(n, generator=g), torch.randn(k, r, generator=g), torch.randn(n, r, generator=g)
    assert torch.equal(pk.unpack_vector(pk.pack_vector(v)), v)
    assert torch.equal(pk.unpack_proj_down(pk.pack_proj_down(down)), down)
    assert torch.equal(pk.unpack_proj_up(pk.pack_proj_up(up)), up)
    awq = torch.randint(0, 16, (n, k), generator=g).to(torch.uint8)
    assert torch.equal(pk.unpack_awq_codes(pk.pack_awq_codes(awq)), awq)
    m = torch.randn(6 * 16, 3, generator=g)
    assert torch.equal(pk.deinterleave_rows(pk.interleave_rows(m, 6), 6), m)
    assert pk.interleave_rows(torch.arange(12.0), 3).tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]


def test_codes_two_per_byte_round_trip_and_weigh_a_quarter_of_bf16():
    codes = torch.tensor([[-8, 7, -1, 0, 3, -4], [1, 2, 3, 4, 5, 6]], dtype=torch.int8)
    packed = nx.pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed[0].tolist() == [0x78, 0x0F, 0xC3]  # low nibble = even code
    assert torch.equal(nx.unpack_nibbles(packed, signed=True), codes)
    e2m1 = torch.arange(16, dtype=torch.uint8).repeat(2)
    assert torch.equal(nx.unpack_nibbles(nx.pack_nibbles(e2m1), signed=False), e2m1)
    with pytest.raises(ValueError, match="count must be even"):
        nx.pack_nibbles(codes[:, :5])
    from pipeline.quantization.apply import module_bytes

    w, b, x = outlier_layer(k=256, n=128, m=64)
    layer, _ = svdquant_linear(w, b, ActStats(x.abs().amax(0), x), precision="int4", rank=0, alphas=(0.5,))
    dense = torch.nn.Linear(256, 128).to(torch.bfloat16)
    # codes 0.5 byte + bf16 scale per 64 (1/32 byte) + smooth and bias: just over a quarter of bf16
    assert 0.25 < module_bytes(layer) / module_bytes(dense) < 0.28


def outlier_layer(seed=0, k=512, n=512, m=384):
    """Activations with 8 channels 20-100x the rest; a weight with a few dominant directions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:8]] *= torch.linspace(20, 100, 8)
    w = torch.randn(n, k, generator=g) / k**0.5 + 0.3 * (torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g)) / k**0.5
    return w, torch.randn(n, generator=g) * 0.1, x


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_svdquant_beats_smoothing_beats_plain_and_improves_with_rank(precision):
    w, b, x = outlier_layer()
    stats, held_out = ActStats(x[:256].abs().amax(0), x[:256]), x[256:]
    ref = held_out @ w.T + b

    def err(**kw):
        layer, _ = svdquant_linear(w, b, stats, precision=precision, **kw)
        return float((layer(held_out) - ref).norm() / ref.norm())

    plain, smooth = err(rank=0, smooth=False), err(rank=0)
    ranks = [err(rank=r) for r in (8, 16, 32, 64)]
    assert ranks[2] < smooth < plain
    assert ranks == sorted(ranks, reverse=True) and ranks[0] > ranks[-1]
    assert ranks[2] < plain / 5


def test_unsigned_layer_folds_the_shift_into_the_bias():
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.gelu(torch.randn(256, 128, generator=g), approximate="tanh")
    w, b = torch.randn(128, 128, generator=g) / 12, torch.randn(128, generator=g)
    layer, report = svdquant_linear(w, b, ActStats(x.abs().amax(0), x), precision="int4", rank=32, act_unsigned=True)
    assert layer.act_unsigned and layer.act_shift == nx.GELU_SHIFT and report.unsigned
    folded = (b - w.sum(1) * nx.GELU_SHIFT).to(torch.bfloat16)
    assert torch.equal(layer.bias, folded)
    assert report.rel_error < 0.05
