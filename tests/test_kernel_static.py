"""The GPU kernels compile for the GPUs dispatch sends them to, checked on CPU with Triton's AOT compiler.

GPU tests only run where a GPU is lent; this catches what would break there first (a dot type a
target lacks, PTX ptxas rejects, shared memory over budget, register spills in an autotune config).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    r = subprocess.run([sys.executable, "benchmarks/kernel_static.py", "--targets", "90:fp8", "89:fp8", "80:int8",
                        "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "instr/group" in r.stdout  # the table
    return json.loads(out.read_text())


def test_every_autotune_config_compiles_for_hopper_ada_and_ampere_and_none_kept_spills_in_the_k_loop(report):
    from pipeline.kernels.triton_w4a4 import GEMM_CONFIGS, _prune

    assert len(report) == 2 * 3 * len(GEMM_CONFIGS)  # each target's plain GEMM and its GELU-quantize variant
    assert sum(r["epilogue"] == "gelu_quant" for r in report) == 3 * len(GEMM_CONFIGS)
    for r in report:
        where = f"sm_{r['arch']} {r['dot']} {r['config']}"
        assert r["ctas_per_sm"] >= 1 and 0 < r["shared_bytes"] <= 227 * 1024, where
        assert r["async_loads"] > 0, f"{where}: operand loads are not pipelined"
        assert r["instructions_per_group"] > 0 and 0 < r["est_peak_fraction"] <= 1, where
        # a few spilled bytes around the epilogue cost once per tile; in the K loop they cost every group
        if _prune([GEMM_CONFIGS[r["config_index"]]], {}, arch=r["arch"]):
            assert r["loop_spills"] == 0, f"{where}: {r['loop_spills']} local loads/stores per K group: prune it"
            assert r["spill_bytes"] <= 256, f"{where} spills {r['spill_bytes']} bytes"
    for arch in (90, 89, 80):
        assert len(_prune(GEMM_CONFIGS, {}, arch=arch)) >= 4  # the autotuner keeps a choice


def test_hopper_runs_fp8_wgmma_ada_fp8_and_ampere_int8_mma_sync(report):
    for r in report:
        # Hopper: FP8 warpgroup MMAs, and the scale outer product on BF16 ones; Ada/Ampere: mma.sync, FP32 scales
        expected = {90: {"QGMMA", "HGMMA"}, 89: {"QMMA"}, 80: {"IMMA"}}[r["arch"]]
        assert set(r["mma_instructions"]) == expected, (r["config"], r["mma_instructions"])
        assert r["scale_mma"] == (r["arch"] == 90)
        # H100 and A100 take weight codes expanded one per byte (no conversion in the K loop), Ada packed
        assert r["expand_weights"] == (r["arch"] != 89)
        converts = {"F2FP", "HADD2"} if r["dot"] == "fp8" else {"LOP3"}
        assert bool(converts & set(r["top_instructions"])) != r["expand_weights"], (r["config"], r["top_instructions"])
        # codes become FP8/INT8 by bit ops and INT32 sums fp32 by the MMA's addend, never by int<->float conversions
        assert "I2F" not in r["top_instructions"] and "F2I" not in r["top_instructions"], r["top_instructions"]


def test_gelu_quantize_epilogue_leaves_the_k_loop_as_it_is(report):
    """The MLP's first layer quantizes for the next layer in its epilogue: once per tile, so its K loop must
    compile to about what the plain GEMM's does: no spills, the same CTAs per SM, instructions within 10%
    (register allocation shifts with the epilogue: up to +7% on Ada, where converting packed weights dominates)."""
    plain = {(r["arch"], r["config"]): r for r in report if r["epilogue"] == "store"}
    for r in (r for r in report if r["epilogue"] == "gelu_quant"):
        base = plain[(r["arch"], r["config"])]
        where = f"sm_{r['arch']} {r['config']}"
        assert r["loop_spills"] == 0 and r["spill_bytes"] <= 256, where
        assert abs(r["instructions_per_group"] - base["instructions_per_group"]) <= 0.1 * base["instructions_per_group"], where
        assert r["shared_bytes"] <= 227 * 1024 and r["ctas_per_sm"] == base["ctas_per_sm"], where
        # GELU + the activation kernel's work (32-33 instructions per element), once per element: no IEEE
        # divisions per element (each costs ~10 with its slow-path check), no local-memory round trips
        extra = r["outside_loop_per_element"] - base["outside_loop_per_element"]
        assert 0 < extra <= 48, f"{where}: the epilogue adds {extra} instructions per element"


def _compiled_rows(code: str) -> list[list[str]]:
    """Run `code` (compiling, not interpreting) in a fresh interpreter: its printed lines, split on spaces."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [line.split() for line in r.stdout.strip().splitlines()]


def test_activation_kernel_compiles_for_each_code_format_and_target():
    rows = _compiled_rows(
        "import sys; sys.path.insert(0, 'benchmarks'); import kernel_static as ks\n"
        "for arch, codes in [(90, 'fp8'), (90, 'packed'), (80, 'int8')]:\n"
        "    ck = ks.compile_quantize(arch, codes)\n"
        "    print(arch, codes, ks._ptxas_usage(ck.asm['ptx'], arch)[1], 'st.global' in ck.asm['ptx'])\n")
    assert [r[:2] for r in rows] == [["90", "fp8"], ["90", "packed"], ["80", "int8"]]
    assert all(r[2] == "0" and r[3] == "True" for r in rows)  # no spills; the codes are stored


def test_activation_kernel_rounds_and_converts_without_int_float_conversions():
    """Codes go float -> FP8 (F2FP) or INT8 (a magic add), rounding is one FRND, the low-rank product
    of 16-bit inputs is one 16-bit MMA per tile (no TF32x3 splitting)."""
    rows = _compiled_rows(
        "import sys; sys.path.insert(0, 'benchmarks'); import kernel_static as ks\n"
        "for arch, codes in [(90, 'fp8'), (80, 'int8')]:\n"
        "    per, ops = ks.quantize_instructions(arch, codes)\n"
        "    print(arch, codes, round(per), ops['F2I'] + ops['I2F'], ops['FRND'], ops['HMMA'])\n")
    assert len(rows) == 2
    for row in rows:
        arch, codes, per_element, conversions, rounds, mmas = row
        assert conversions == "0", row
        assert int(rounds) == 16, row  # one per element a thread holds (32 x 64 over 128 threads)
        assert int(mmas) <= 8, row  # (32 x 64) x (64 x 32) as m16n8k16: 8 per warp (TF32x3 took 96)
        assert int(per_element) < 40, row  # it was 100 with floor rounding, int codes and TF32x3


def test_weight_expansion_compiles_to_bit_operations_for_fp8_and_int8():
    rows = _compiled_rows(
        "import sys; sys.path.insert(0, 'benchmarks'); import kernel_static as ks\n"
        "for arch, dot in [(90, 'fp8'), (80, 'int8')]:\n"
        "    ptx = ks.compile_expand(arch, dot).asm['ptx']\n"
        "    print(arch, dot, ks._ptxas_usage(ptx, arch)[1], 'cvt.rn.satfinite.e4m3x2.f16x2' in ptx,\n"
        "          'mad.lo.u32' in ptx, 'cvt.rn.f32.s32' in ptx or 'cvt.rn.f16.s32' in ptx)\n")
    # FP8 through the fp16 bias trick, INT8 by the sign-extending multiply-add: no int-to-float conversions
    assert rows == [["90", "fp8", "0", "True", "False", "False"], ["80", "int8", "0", "False", "True", "False"]]


def test_qk_norm_rope_kernel_compiles_without_spills_and_stays_cheap_per_element():
    """The attention's q/k kernel (triton_rope.py) for Hopper, Ada and Ampere, as FLUX and Qwen-Image launch it.
    It moves 4 bytes per element (2 read, 2 written): at H100's ~3 TB/s that is ~1.3 ps per element, and ~25
    instructions per element (one thread's view) issue in about the same time, so it stays memory-bound."""
    rows = _compiled_rows(
        "import sys; sys.path.insert(0, 'benchmarks'); import kernel_static as ks\n"
        "for arch in (90, 89, 80):\n"
        "    for paired in (False, True):\n"
        "        print(arch, paired, *ks.rope_kernel_usage(arch, paired))\n")
    assert [(r[0], r[1]) for r in rows] == [(a, p) for a in ("90", "89", "80") for p in ("False", "True")]
    for _, _, per_element, regs, spills in rows:
        assert spills == "0" and int(regs) <= 128
        assert float(per_element) <= 32, per_element


def test_adaln_norm_kernel_compiles_without_spills():
    """AdaLN's LayerNorm + modulation (triton_norm.py) at FLUX's width: a row per program, no spills, few
    instructions per element (2 bytes read and 2 written each)."""
    rows = _compiled_rows(
        "import sys; sys.path.insert(0, 'benchmarks'); import kernel_static as ks\n"
        "for arch in (90, 89, 80):\n"
        "    print(arch, *ks.norm_kernel_usage(arch))\n")
    assert [r[0] for r in rows] == ["90", "89", "80"]
    for _, per_element, regs, spills in rows:
        assert spills == "0" and int(regs) <= 128
        assert float(per_element) <= 32, per_element


def test_gated_and_mapped_epilogues_leave_the_k_loop_as_it_is():
    """The GEMM whose epilogue computes residual + gate · y (fused_block.py), and the one that writes its rows into
    a joint tensor (w4a4_gemm's out), on Hopper and Ampere: the same K loop as the plain GEMM, no spills."""
    rows = _compiled_rows(
        "import sys; sys.path.insert(0, 'benchmarks'); import kernel_static as ks\n"
        "from pipeline.kernels import triton_w4a4 as kw\n"
        "for arch, dot in [(90, 'fp8'), (80, 'int8')]:\n"
        "    for variant in ('plain', 'gated', 'mapped'):\n"
        "        ck = ks.compile_gemm(arch, dot, kw.GEMM_CONFIGS[1], kw.scale_mma_default(dot, arch, kw.torch.bfloat16,"
        " kw.torch.bfloat16), kw.expand_weights_default(dot, arch), gated=variant == 'gated',"
        " mapped=variant == 'mapped')\n"
        "        lines, labels = ks.sass(ck.asm['cubin'])\n"
        "        print(arch, variant, sum(ks.loop_opcodes(lines, labels).values()),"
        " ks._ptxas_usage(ck.asm['ptx'], arch)[1])\n")
    loops = {(r[0], r[1]): int(r[2]) for r in rows}
    assert len(rows) == 6 and all(r[3] == "0" for r in rows)
    for arch in ("90", "80"):
        for variant in ("gated", "mapped"):
            assert abs(loops[(arch, variant)] - loops[(arch, "plain")]) <= 0.05 * loops[(arch, "plain")], loops
