"""Triton W4A4 kernels against the PyTorch reference: on CPU through Triton's interpreter, on GPU for real.

The interpreter rounds fp32->bf16 by truncation (GPUs round to nearest even), so CPU checks use
fp32 and fp16, where both are exact; bf16 is checked on a GPU. On a GPU the same tests run the
compiled kernels with the autotuner's tiles (the block sizes passed here apply to the interpreter,
which conftest.py switches on without CUDA).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pipeline.kernels.dispatch import kernel_mode  # noqa: E402
from pipeline.kernels.triton_w4a4 import (expand_weight_codes, expand_weights_default, natural_order,  # noqa: E402
                                          quantize_act, w4a4_gemm)
from pipeline.quantization import numerics as nx  # noqa: E402
from pipeline.quantization.quantizer import ActStats, svdquant_linear  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def make_layer(m, k, n, rank, unsigned, precision="int4", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 3] *= 30  # an outlier channel
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    w, b = torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, generator=g)
    layer, _ = svdquant_linear(w, b, ActStats(x.abs().amax(0), x), precision=precision, rank=rank,
                               act_unsigned=unsigned, alphas=(0.5,))
    return layer.to(DEVICE), x.to(DEVICE)


def hold_in(dtype, *layers):
    """As a 16-bit model holds them: smooth and the low-rank factors in its dtype (then the down projection is
    one 16-bit MMA and the up projection splits only `low`); an fp32 model keeps them as quantized."""
    if dtype != torch.float32:
        for layer in layers:
            layer.smooth, layer.proj_down, layer.proj_up = (t.to(dtype) for t in (layer.smooth, layer.proj_down,
                                                                                 layer.proj_up))


# (M, K, N, rank): ragged M and N (not multiples of any tile), rank 0, rank not a power of two.
SHAPES = [(1, 128, 32, 16), (17, 128, 96, 32), (40, 256, 160, 0), (33, 384, 64, 48)]
# precision, unsigned activations, dot type
KINDS = [("int4", False, "fp8"), ("int4", True, "fp8"), ("int4", False, "int8"), ("int4", True, "int8"),
         ("nvfp4", False, "fp16")]


def reference_act(layer, x):
    shifted = x + layer.act_shift if layer.act_shift else x
    return shifted, nx.quantize_act(shifted / layer.smooth.to(x.dtype), layer.precision, layer.act_unsigned)


@pytest.mark.parametrize("m,k,n,rank", SHAPES)
@pytest.mark.parametrize("precision,unsigned", [("int4", False), ("int4", True), ("nvfp4", False)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_kernel_matches_reference_exactly(m, k, n, rank, precision, unsigned, dtype):
    layer, x = make_layer(m, k, n, rank, unsigned, precision)
    x = x.to(dtype)
    if dtype != torch.float32:  # as a 16-bit model holds them: the low-rank product is then one 16-bit MMA
        layer.smooth, layer.proj_down = layer.smooth.to(dtype), layer.proj_down.to(dtype)
    codes, scales, low = quantize_act(x, layer.smooth, layer.proj_down, layer.act_shift, unsigned, precision,
                                      block_m=16)
    shifted, (ref_codes, ref_scales) = reference_act(layer, x)
    assert codes.dtype == torch.uint8 and codes.shape == (m, k // 2)  # two codes per byte
    assert torch.equal(nx.unpack_nibbles(codes, signed=precision == "int4" and not unsigned), ref_codes)
    assert torch.equal(scales, ref_scales if precision == "int4" else ref_scales.float())
    assert torch.allclose(low, shifted.float() @ layer.proj_down.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt,dtype", [("fp8", torch.float8_e4m3fn), ("int8", torch.int8)])
@pytest.mark.parametrize("unsigned", [False, True])
def test_activation_codes_one_per_byte_in_the_dot_type(fmt, dtype, unsigned):
    """INT4 codes for the GEMM's tensor cores: one per byte, each 8 codes' evens then odds, same values."""
    layer, x = make_layer(17, 192, 32, 16, unsigned)
    codes, scales, low = quantize_act(x, layer.smooth, layer.proj_down, layer.act_shift, unsigned, codes=fmt,
                                      block_m=16)
    packed, scales_p, low_p = quantize_act(x, layer.smooth, layer.proj_down, layer.act_shift, unsigned, block_m=16)
    _, (ref_codes, ref_scales) = reference_act(layer, x)
    assert codes.dtype == dtype and codes.shape == (17, 192)
    assert torch.equal(natural_order(codes), ref_codes.to(torch.int8))
    assert torch.equal(codes[:, 4:8].float(), ref_codes[:, 1:8:2].float())  # codes 1, 3, 5, 7
    assert torch.equal(codes[:, 72:76].float(), ref_codes[:, 72:80:2].float())  # codes 72, 74, 76, 78 (group 1)
    assert torch.equal(scales, ref_scales) and torch.equal(scales, scales_p) and torch.equal(low, low_p)
    with pytest.raises(ValueError, match="packed two per byte"):
        quantize_act(x, layer.smooth, layer.proj_down, 0.0, False, "nvfp4", codes=fmt)
    other = "int8" if fmt == "fp8" else "fp8"
    with pytest.raises(ValueError, match=f"do not feed dot '{other}'"):
        w4a4_gemm(codes, scales, layer.packed_codes, layer.wscales, low, layer.proj_up, None, torch.float32, other)


@pytest.mark.parametrize("fmt,dtype", [("fp8", torch.float8_e4m3fn), ("int8", torch.int8)])
@pytest.mark.parametrize("k", [192, 256])  # the expansion's K tile: 64 or 128
def test_weight_codes_expand_to_one_per_byte_in_the_gemm_k_order(fmt, dtype, k):
    """The GEMM's other operand format: weights one per byte, in the order activations are written."""
    layer, x = make_layer(5, k, 72, 16, False)  # 72 rows: a ragged tile of the expansion
    wide = expand_weight_codes(layer.packed_codes, fmt)
    assert wide.dtype == dtype and wide.shape == (72, k)
    assert torch.equal(natural_order(wide), layer.qweight)
    acts, _, _ = quantize_act(x, layer.smooth, layer.proj_down, 0.0, False, codes=fmt, block_m=16)
    # both operands in one K order: a plain matmul of the codes gives the groups' integer dot products
    assert torch.equal(acts.float() @ wide.float().T, natural_order(acts).float() @ layer.qweight.float().T)
    with pytest.raises(ValueError, match="INT4 dots"):
        expand_weight_codes(layer.packed_codes, "fp16")
    with pytest.raises(ValueError, match="multiple of the INT4 group"):
        expand_weight_codes(layer.packed_codes[:, :40], fmt)
    other = "int8" if fmt == "fp8" else "fp8"
    codes, scales, low = quantize_act(x, layer.smooth, layer.proj_down, 0.0, False, block_m=16)
    with pytest.raises(ValueError, match=f"weight codes of dtype {dtype} do not feed dot '{other}'"):
        w4a4_gemm(codes, scales, wide, layer.wscales, low, layer.proj_up, None, torch.float32, other)


def test_weights_expand_by_default_where_the_static_report_shows_it_pays():
    assert expand_weights_default("fp8", 90) and expand_weights_default("int8", 80)
    assert not any(expand_weights_default(dot, arch) for dot, arch in
                   [("fp8", 89), ("int8", 86), ("int8", 90), ("fp16", 90), ("fp8", None)])


def test_nvfp4_activation_rounding_at_ties_and_subnormal_scales():
    """E2M1 ties go to the even code, E4M3 scale ties to the even mantissa, tiny scales are subnormal."""
    row = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -1.75, -5.0, 0.1, -6.0, 4.9, 0.0, 2.9])
    x = torch.stack([row, row * 1.0625, row * 2**-8, row * 3 * 2**-10, row * 1e4, -row * 1.1875])
    k = x.shape[1]
    codes, scales, _ = quantize_act(x, torch.ones(k), torch.zeros(k, 0), 0.0, False, "nvfp4", block_m=16)
    ref_codes, ref_scales = nx.quantize_nvfp4_act(x)
    assert torch.equal(scales, ref_scales.float())
    assert scales[:4, 0].tolist() == [1.0, 1.0, 2**-8, 2**-8] and scales[4, 0] == 448.0
    assert torch.equal(nx.unpack_nibbles(codes, signed=False), ref_codes)
    assert nx.e2m1_decode(ref_codes[0]).tolist() == [6, 0, 1, 1, 2, 2, 4, 4, -0.0, -2, -4, 0, -6, 4, 0, 3]


def gemm_cases() -> list:
    """Every shape x kind x dtype on a GPU. In the interpreter, every shape x kind in fp32, and the 16-bit dtypes (which
    change only the output rounding) on the two shapes that between them take both code formats and both places
    s_a x s_w is formed: 30 cases instead of 40, each a second or more."""
    cases = [pytest.param(*shape, *kind, dtype, id=f"{dtype}-{'-'.join(map(str, kind + shape))}")
             for dtype in DTYPES for kind in KINDS for shape in SHAPES]
    if DEVICE.type == "cuda":
        return cases
    return [c for c in cases if c.values[-1] == torch.float32 or tuple(c.values[:4]) in (SHAPES[1], SHAPES[2])]


@pytest.mark.parametrize("m,k,n,rank,precision,unsigned,dot,dtype", gemm_cases())
def test_gemm_kernel_matches_reference(m, k, n, rank, precision, unsigned, dot, dtype):
    layer, x = make_layer(m, k, n, rank, unsigned, precision)
    x = x.to(dtype)
    hold_in(dtype, layer)
    fmt = dot if precision == "int4" and m % 2 else "packed"  # activation codes in both formats
    codes, scales, low = quantize_act(x, layer.smooth, layer.proj_down, layer.act_shift, unsigned, precision,
                                      block_m=16, codes=fmt)
    y = w4a4_gemm(codes, scales, layer.packed_codes, layer.wscales, low, layer.proj_up, layer.bias, dtype, dot,
                  unsigned, layer.wtscale, layer.wcscales, block_m=16, block_n=32, scale_mma=m < 30,
                  expand_weights=m > 16)
    ref = layer.reference_forward(x)
    assert y.dtype == dtype and y.shape == (m, n)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]  # fp32 accumulation order + output rounding
    assert ((y.float() - ref.float()).abs().max() / ref.float().abs().max()) < tol


@pytest.mark.parametrize("scale_mma", [False, True])
@pytest.mark.parametrize("scale_dtype", [torch.float16, None])
def test_gemm_is_exact_in_fp32_whatever_the_tiles(scale_mma, scale_dtype):
    """Group products and s_a·s_w are exact, groups are added in K order: tiles, where s_a ⊗ s_w is
    formed (tensor cores for 16-bit scales of one dtype, else FP32) and whether weight codes come packed
    or expanded change no bit in fp32."""
    layer, x = make_layer(37, 256, 72, 0, False)
    codes, scales, low = quantize_act(x, layer.smooth, layer.proj_down, 0.0, False, block_m=16)
    wscales = layer.wscales
    if scale_dtype is not None:  # as a 16-bit model has them (scales of fp32 x and bf16 weights otherwise)
        scales, wscales = scales.to(scale_dtype), wscales.to(scale_dtype)
    args = (codes, scales, layer.packed_codes, wscales, low, layer.proj_up, None, torch.float32)
    a = w4a4_gemm(*args, "fp8", block_m=16, block_n=16, scale_mma=scale_mma, expand_weights=scale_mma)
    b = w4a4_gemm(*args, "int8", block_m=32, block_n=64, scale_mma=not scale_mma, expand_weights=not scale_mma)
    ref = nx.w4a4_matmul(nx.unpack_nibbles(codes, True), scales, layer.qweight, wscales, "int4")
    if DEVICE.type == "cpu":
        assert torch.equal(a, b) and torch.equal(a, ref)
    else:  # a GPU may fuse the scale multiply-add into one FMA (one rounding instead of two)
        assert torch.allclose(a, ref, rtol=1e-6, atol=1e-6) and torch.allclose(b, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_layer_dispatches_to_the_kernels_and_compiles_without_graph_breaks(monkeypatch, precision):
    layer, x = make_layer(24, 128, 64, 16, unsigned=False, precision=precision)
    if DEVICE.type == "cpu":
        monkeypatch.setenv("SVDQ_KERNELS", "triton")
    assert kernel_mode(x.device, precision) == ("fp16" if precision == "nvfp4" else kernel_mode(x.device, "int4"))
    assert kernel_mode(x.device, "int4") in ("fp8", "int8")
    y = layer(x.reshape(2, 12, 128))
    assert y.shape == (2, 12, 64)
    assert torch.allclose(y.reshape(24, 64), layer.reference_forward(x), rtol=1e-4, atol=1e-4)
    explain = torch._dynamo.explain(layer)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    monkeypatch.setenv("SVDQ_KERNELS", "reference")
    assert kernel_mode(x.device, "int4") == "reference" and kernel_mode(x.device, "nvfp4") == "reference"
    explain = torch._dynamo.explain(layer)(x)
    assert explain.graph_break_count == 0, explain.break_reasons


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_input_layer_reads_column_slices_in_place_and_adds_in_the_epilogue(monkeypatch, dtype):
    """FLUX single blocks' proj_out: each half reads its slice of the wide input without a copy, and the
    second GEMM adds the first's output before its one rounding (kernels and reference alike)."""
    from pipeline.quantization.layers import SplitInputLinear

    first, x1 = make_layer(20, 128, 64, 16, False, seed=1)
    second, x2 = make_layer(20, 192, 64, 16, True, seed=2)
    hold_in(dtype, first, second)
    wide = torch.cat([x1, x2], dim=1).to(dtype).reshape(2, 10, 320)
    split = SplitInputLinear(first, second)
    ref = split(wide)  # the reference path
    y1 = first.reference_forward(wide[..., :128])
    assert torch.equal(ref, second.reference_forward(wide[..., 128:], residual=y1))
    unfused = (y1.float() + second.reference_forward(wide[..., 128:]).float())
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert (ref.float() - unfused).abs().max() / unfused.abs().max() < tol
    if DEVICE.type == "cpu":
        monkeypatch.setenv("SVDQ_KERNELS", "triton")
    reads = []
    real = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous",
                        lambda t, *a, **k: (reads.append(t.is_contiguous()), real(t, *a, **k))[1])
    y = split(wide)
    monkeypatch.undo()
    assert y.shape == (2, 10, 64) and y.dtype == dtype
    assert (y.float() - ref.float()).abs().max() / ref.float().abs().max() < tol
    assert all(reads), "a strided input slice was copied"
    codes, scales, low = quantize_act(wide.reshape(20, 320)[:, 128:], second.smooth, second.proj_down,
                                      second.act_shift, True, block_m=16)
    same = quantize_act(real(wide.reshape(20, 320)[:, 128:]), second.smooth, second.proj_down, second.act_shift,
                        True, block_m=16)
    assert all(torch.equal(a, b) for a, b in zip((codes, scales, low), same))
    with pytest.raises(ValueError, match=r"residual of shape \(3, 64\) does not match the output \(20, 64\)"):
        w4a4_gemm(codes, scales, second.packed_codes, second.wscales, low, second.proj_up, None, dtype, "fp8",
                  True, residual=torch.zeros(3, 64, dtype=dtype, device=DEVICE))


def make_mlp(m, k, hidden, n, rank, next_rank, dtype, seed=0):
    """fc1 (k -> hidden) and fc2 (hidden -> n, unsigned GELU inputs with the shift), held in `dtype`."""
    fc1, x = make_layer(m, k, hidden, rank, False, seed=seed)
    fc2, _ = make_layer(m, hidden, n, next_rank, True, seed=seed + 1)
    hold_in(dtype, fc1, fc2)
    return fc1, fc2, x.to(dtype)


@pytest.mark.parametrize("m,hidden,next_rank,block_n", [(37, 192, 32, 64), (37, 192, 0, 128), (5, 256, 24, None)])
@pytest.mark.parametrize("dot", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_quantize_epilogue_gives_the_next_layers_activation_codes(m, hidden, next_rank, block_n, dot, dtype):
    """fc1's GEMM with GELU and fc2's activation quantization in its epilogue equals fc1 -> torch's GELU ->
    fc2's activation kernel: codes, scales, low-rank down (ragged M, a column tile past N, rank 0)."""
    from pipeline.kernels.triton_w4a4 import w4a4_gemm_gelu_quant

    fc1, fc2, x = make_mlp(m, 128, hidden, 64, 16, next_rank, dtype)
    c1, s1, l1 = quantize_act(x, fc1.smooth, fc1.proj_down, 0.0, False, codes=dot)
    fc1_args = (c1, s1, fc1.packed_codes, fc1.wscales, l1, fc1.proj_up, fc1.bias, dtype, dot, False)
    h = torch.nn.functional.gelu(w4a4_gemm(*fc1_args), approximate="tanh")
    want = quantize_act(h, fc2.smooth, fc2.proj_down, fc2.act_shift, True, codes=dot)
    got = w4a4_gemm_gelu_quant(*fc1_args, fc2.smooth, fc2.proj_down, fc2.act_shift, True, block_n=block_n)
    assert fc2.act_shift > 0 and [t.shape for t in got] == [t.shape for t in want]
    assert [t.dtype for t in got] == [t.dtype for t in want]
    codes, ref_codes = natural_order(got[0]).int(), natural_order(want[0]).int()
    # GELU's fp32 arithmetic is not torch's to the last bit: a 16-bit rounding may rarely differ by a step
    assert (codes != ref_codes).float().mean() <= 1e-3 and (codes - ref_codes).abs().max() <= 1
    assert torch.allclose(got[1].float(), want[1].float(), rtol=1e-3, atol=0)
    big = float(want[2].abs().max()) if want[2].numel() else 0.0
    assert torch.allclose(got[2], want[2], rtol=1e-3, atol=1e-3 * big)
    with pytest.raises(ValueError, match="block_n = 96 must be a multiple of the INT4 group"):
        w4a4_gemm_gelu_quant(*fc1_args, fc2.smooth, fc2.proj_down, fc2.act_shift, True, block_n=96)
    with pytest.raises(ValueError, match=r"the next layer takes 64 inputs \(proj_down \(64, "):
        w4a4_gemm_gelu_quant(*fc1_args, fc2.smooth[:64], fc2.proj_down[:64], fc2.act_shift, True)


def test_autotune_leaves_out_the_tiles_that_spill_on_the_gpu_at_hand():
    from pipeline.kernels.triton_w4a4 import GEMM_CONFIGS, _prune

    def tiles(arch):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in _prune(GEMM_CONFIGS, {}, arch)}

    assert len(tiles(90)) == len(GEMM_CONFIGS)  # Hopper's warpgroup MMAs keep every tile
    for arch in (89, 86, 80):  # mma.sync: 64x128 on 4 warps spills in the K loop (kernel_static)
        assert (64, 128, 4) not in tiles(arch) and len(tiles(arch)) == len(GEMM_CONFIGS) - 1


@pytest.mark.parametrize("m,k,n", [(1, 128, 96), (3, 256, 200), (16, 64, 33)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_awq_gemv_matches_the_reference(m, k, n, dtype):
    from pipeline.kernels.triton_awq import awq_gemv
    from pipeline.quantization.quantizer import awq_w4a16

    g = torch.Generator().manual_seed(k + n)
    layer = awq_w4a16(torch.randn(n, k, generator=g), torch.randn(n, generator=g), dtype16=torch.float16).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    y = awq_gemv(x, layer.packed_codes, layer.wscales, layer.wzeros, layer.bias)
    ref = layer.reference_forward(x)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert y.dtype == dtype and ((y.float() - ref.float()).abs().max() / ref.float().abs().max()) < tol


def test_awq_layer_uses_the_gemv_for_few_rows_and_compiles_without_graph_breaks(monkeypatch):
    from pipeline.kernels import dispatch
    from pipeline.quantization.quantizer import awq_w4a16

    g = torch.Generator().manual_seed(0)
    layer = awq_w4a16(torch.randn(96, 128, generator=g), None).to(DEVICE)
    if DEVICE.type == "cpu":
        monkeypatch.setenv("SVDQ_KERNELS", "triton")
    calls = []
    monkeypatch.setattr(layer, "reference_forward", lambda x: calls.append(x.shape) or torch.zeros(1))
    x = torch.randn(2, 1, 128, generator=g).to(DEVICE, torch.bfloat16 if DEVICE.type == "cuda" else torch.float32)
    assert layer(x).shape == (2, 1, 96) and not calls  # 2 rows: the GEMV
    explain = torch._dynamo.explain(layer)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    many = torch.randn(dispatch.AWQ_MAX_ROWS + 1, 128).to(DEVICE, x.dtype)
    layer(many)
    assert calls == [many.shape]  # many rows: dequantize + GEMM (the reference)


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-qwen-image"])
def test_whole_quantized_transformer_traces_as_one_graph(monkeypatch, model):
    """torch.compile sees the whole INT4 transformer (W4A4 layers, AWQ modulation) with no graph break."""
    from conftest import ONE_BLOCK_EACH
    from test_checkpoint import quantized_pipe, transformer_inputs

    if DEVICE.type == "cpu":
        monkeypatch.setenv("SVDQ_KERNELS", "triton")
    transformer = quantized_pipe(model, "int4", *ONE_BLOCK_EACH).transformer.to(DEVICE)
    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in transformer_inputs(model).items()}
    explain = torch._dynamo.explain(transformer)(**kw)
    assert (explain.graph_count, explain.graph_break_count) == (1, 0), explain.break_reasons


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-qwen-image"])
def test_fused_mlps_skip_the_activation_pass_of_every_fc2_and_match_the_unfused_kernels(monkeypatch, model):
    """With the kernels on, each MLP quantizes its input once (fc1's); fc2's input comes out of fc1's epilogue.
    The transformer's output matches the unfused kernels' and the reference's."""
    from conftest import fusion_on_and_off

    from pipeline.kernels import triton_w4a4
    from pipeline.quantization import fused_mlp

    transformer, (fused, ref, fused_passes), (plain, plain_ref, plain_passes) = fusion_on_and_off(
        monkeypatch, model, fused_mlp, triton_w4a4, "quantize_act")
    mlps = 2 * len(transformer.transformer_blocks) + len(getattr(transformer, "single_transformer_blocks", []))
    assert plain_passes - fused_passes == mlps
    assert torch.equal(ref, plain_ref)
    for got in (fused, plain):
        assert (got.float() - ref.float()).abs().max() / ref.float().abs().max() < 1e-4
    assert (fused.float() - plain.float()).abs().max() / plain.float().abs().max() < 1e-4


def test_layers_hold_weight_codes_two_per_byte():
    layer, _ = make_layer(8, 256, 96, 16, False)
    assert layer.packed_codes.dtype == torch.uint8 and layer.packed_codes.shape == (96, 128)
    assert layer.qweight.shape == (96, 256) and int(layer.qweight.min()) >= -8 and int(layer.qweight.max()) <= 7
    assert torch.equal(nx.pack_nibbles(layer.qweight), layer.packed_codes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_pipeline_on_gpu_matches_the_reference_path(tmp_path, monkeypatch):
    from conftest import run_config
    from pipeline.runner import psnr, run_job

    overrides = ["job.limit=2", "job.progress=none", "sampler.device=cuda", "sampler.dtype=bfloat16"]
    run_job(run_config(overrides), tmp_path / "kernels")
    monkeypatch.setenv("SVDQ_KERNELS", "reference")
    run_job(run_config(overrides), tmp_path / "reference")
    from PIL import Image

    for name in ("cat_0.png", "lighthouse_42.png"):
        assert psnr(Image.open(tmp_path / "kernels" / name), Image.open(tmp_path / "reference" / name)) > 35
