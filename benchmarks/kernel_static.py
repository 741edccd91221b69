"""Static report of the W4A4 GEMM kernel as compiled for a GPU, made without one.

Triton compiles ahead of time for any target (`triton.compile(..., target=GPUTarget("cuda", 90, 32))`)
and ships ptxas and nvdisasm, so on a CPU machine we can still see, per autotune config and GPU
architecture: registers, spills, shared memory, how many CTAs fit on an SM, whether the operand
loads are asynchronous (cp.async) and whether the tensor-core MMAs are waited on at once, and the
SASS instructions one thread issues per 64-wide K group. From those an issue model bounds the
fraction of tensor-core peak the config can reach:

    MMA clocks per group and CTA   = BLOCK_M · BLOCK_N · G / (MACs per clock per SM)
    issue clocks per group and CTA = instructions per thread · warps / 4 (four schedulers per SM)
    with c CTAs per SM: fraction   = c · MMA / max(c · MMA, c · issue, MMA + issue)

(MMA + issue: a CTA's MMAs are waited on before its rescale, so one CTA alone cannot overlap them;
other CTAs on the SM can.) It ignores memory stalls, so it is an upper bound, not a measurement:
`gpu_bench.py` measures. Usage: python benchmarks/kernel_static.py [--targets 90:fp8 80:int8] [--json F]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pipeline.kernels import triton_w4a4 as kw  # noqa: E402

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# Dense tensor-core MACs per clock per SM, by (compute capability, dot type).
MACS_PER_CLOCK = {(90, "fp8"): 4096, (90, "int8"): 4096, (90, "fp16"): 2048,
                  (89, "fp8"): 1024, (89, "int8"): 1024, (89, "fp16"): 512,
                  (80, "int8"): 2048, (80, "fp16"): 1024}
REGS_PER_SM, SMEM_PER_SM, WARPS_PER_SM = 65536, {90: 232448, 89: 101376, 80: 167936}, {90: 64, 89: 48, 80: 64}
_CODE_POINTER = {"packed": "*u8", "fp8": "*fp8e4nv", "int8": "*i8"}  # Triton pointer type per code format
# The kernel's pointer and integer arguments, as the JIT would specialise them for 16-byte aligned
# tensors (M is not assumed to be a multiple of 16: token counts are ragged).
_ARGS = [("a_ptr", None), ("as_ptr", "*bf16"), ("w_ptr", "*u8"), ("ws_ptr", None), ("low_ptr", "*fp32"),
         ("up_ptr", "*bf16"), ("bias_ptr", "*bf16"), ("wt_ptr", "*fp32"), ("wc_ptr", "*bf16"),
         ("res_ptr", "*bf16"), ("gate_ptr", "*bf16"), ("gres_ptr", "*bf16"), ("out_ptr", "*bf16"), ("M", "i32"),
         ("N", "i32"), ("tokens", "i32"), ("stride_gate", "i32"), ("out_tokens", "i32"), ("out_image_rows", "i32")]


@dataclass
class Report:
    config_index: int  # position in GEMM_CONFIGS
    arch: int
    dot: str
    config: str
    epilogue: str  # "store" (the output) | "gelu_quant" (GELU + the next layer's activation quantization)
    scale_mma: bool  # s_a ⊗ s_w formed on the tensor cores (else FP32 multiplies)
    expand_weights: bool  # weight codes one per byte (expanded before the GEMM; its traffic is not modelled)
    registers: int
    spill_bytes: int  # anywhere in the kernel (ptxas -v)
    loop_spills: int  # local-memory loads/stores in the K loop, where they cost every group
    shared_bytes: int
    ctas_per_sm: int
    async_loads: int
    mma_waits_at_once: bool
    instructions_per_group: float
    outside_loop_per_element: float  # instructions outside the K loop (once per tile: set-up, epilogue) per output element
    est_peak_fraction: float
    mma_instructions: dict
    top_instructions: dict


# The GELU-quantize GEMM's arguments: the next layer's smooth, proj_down, code/scale/low outputs, its shift.
_GELU_QUANT_ARGS = [*_ARGS[:9], ("nsmooth_ptr", "*bf16"), ("ndown_ptr", "*bf16"), ("ncodes_ptr", None),
                    ("nscales_ptr", "*bf16"), ("nlow_ptr", "*fp32"), ("nshift", "fp32"), ("M", "i32"), ("N", "i32")]


def compile_gemm(arch: int, dot: str, config: triton.Config, scale_mma: bool, expand: bool = False, k: int = 3072,
                 rank: int = 32, gelu_quant: bool = False, gated: bool = False, mapped: bool = False):
    """The GEMM compiled for sm_<arch> (bf16 model): Triton's CompiledKernel (PTX, TTGIR, cubin, metadata).

    scale_mma: form s_a ⊗ s_w on the tensor cores (INT4 only) or with FP32 multiplies. expand: weight
    codes come one per byte (expand_weight_codes, INT4 only) instead of packed. gelu_quant: the MLP's
    first layer, whose epilogue quantizes GELU of its output for the next (unsigned, shifted) layer. gated:
    the epilogue computes AdaLN-Zero's residual + gate · y. mapped: it writes each image's rows into a slice of a
    joint tensor (w4a4_gemm's out).
    """
    fp4 = dot == "fp16"
    codes = kw.act_code_format(dot)  # activation codes as the layer feeds them
    expand = expand and not fp4
    arg_list = _GELU_QUANT_ARGS if gelu_quant else _ARGS
    types = dict(arg_list, a_ptr=_CODE_POINTER[codes], ws_ptr="*u8" if fp4 else "*bf16",
                 w_ptr=_CODE_POINTER[codes] if expand else "*u8", ncodes_ptr=_CODE_POINTER[codes])
    const = dict(K=k, R=rank, DOT=kw.DOTS[dot], SIGNED_A=True, HAS_BIAS=True, HAS_WC=fp4,
                 G=kw.NVFP4_GROUP if fp4 else kw.INT4_GROUP, BLOCK_R=kw._pow2(rank),
                 A_BYTES=codes != "packed", W_BYTES=expand, SCALE_MMA=scale_mma, ON_GPU=True, **config.kwargs)
    if gelu_quant:
        const.update(NR=rank, BLOCK_NR=kw._pow2(rank), NEXT_HAS_SHIFT=True, NEXT_UNSIGNED=True,
                     CODES=kw.CODE_FORMATS[codes][0])
    else:
        const.update(HAS_RES=False, HAS_GATE=gated, OUT_MAPPED=mapped)
    args = [(name, types[name]) for name, _ in arg_list]
    aligned = tuple(name for name, _ in arg_list if name not in ("M", "nshift", "tokens", "out_tokens", "out_image_rows"))
    fn = kw._w4a4_gemm_gelu_quant_kernel if gelu_quant else kw._w4a4_gemm_kernel
    return _compile(fn, arch, args, const, aligned, num_warps=config.num_warps, num_stages=config.num_stages)


def _compile(fn, arch: int, args: list, const: dict, aligned: tuple = (), **options):
    """fn compiled for sm_<arch> with its arguments typed and specialised as the JIT would specialise a launch:
    pointers, and the integers named in `aligned`, divisible by 16; `const` as constexprs."""
    signature = {**dict(args), **{name: "constexpr" for name in const}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, t) in enumerate(args) if t.startswith("*") or name in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _usage(ck, arch: int, threads: int, elements: int) -> tuple[float, int, int]:
    """(SASS instructions per element, one thread's view, registers, spill bytes) of a compiled kernel whose
    program of `threads` threads handles `elements` elements."""
    lines, _ = sass(ck.asm["cubin"])
    regs, spills = _ptxas_usage(ck.asm["ptx"], arch)
    return len(lines) * threads / elements, regs, spills


def compile_quantize(arch: int, codes: str, k: int = 3072, rank: int = 32):
    """The activation kernel compiled for sm_<arch>, writing codes as `codes` ("packed" | "fp8" | "int8")."""
    args = [("x_ptr", "*bf16"), ("smooth_ptr", "*bf16"), ("down_ptr", "*bf16"), ("codes_ptr", _CODE_POINTER[codes]),
            ("scales_ptr", "*bf16"), ("low_ptr", "*fp32"), ("M", "i32"), ("stride_xm", "i32"), ("shift", "fp32")]
    const = dict(K=k, R=rank, HAS_SHIFT=False, UNSIGNED=False, FP4=False, G=kw.INT4_GROUP, CODES=kw.CODE_FORMATS[codes][0],
                 BLOCK_M=32, BLOCK_R=kw._pow2(rank), ON_GPU=True)
    # the row stride: a multiple of 16 elements (K, or a wider tensor's width)
    return _compile(kw._quantize_act_kernel, arch, args, const, ("stride_xm",), num_warps=4, num_stages=2)


def compile_expand(arch: int, dot: str, k: int = 3072):
    """The weight expansion (packed INT4 -> one code per byte of the dot's type) compiled for sm_<arch>."""
    args = [("w_ptr", "*u8"), ("out_ptr", _CODE_POINTER[dot]), ("N", "i32")]
    const = dict(K=k, DOT=kw.DOTS[dot], BLOCK_N=64, BLOCK_K=128, ON_GPU=True)
    return _compile(kw._expand_weights_kernel, arch, args, const, num_warps=4, num_stages=2)


_ROPE_ARGS = [("q_ptr", "*bf16"), ("k_ptr", "*bf16"), ("stride_b", "i64"), ("stride_s", "i32"), ("wq_ptr", "*bf16"),
              ("wk_ptr", "*bf16"), ("cos_ptr", "*fp32"), ("sin_ptr", "*fp32"), ("tab_stride_s", "i32"),
              ("tab_stride_j", "i32"), ("tab_row0", "i32"), ("oq_ptr", "*bf16"), ("ok_ptr", "*bf16"),
              ("out_stride_b", "i64"), ("out_stride_s", "i32"), ("out_row0", "i32"), ("S", "i32"), ("H", "i32"),
              ("eps", "fp32")]


def rope_kernel_usage(arch: int, paired: bool, heads: int = 24, head_dim: int = 128) -> tuple[float, int, int]:
    """The q/k norm + RoPE kernel (triton_rope.py) as launched for FLUX (paired=False) or Qwen-Image (True):
    (SASS instructions per element, registers, spill bytes)."""
    from pipeline.kernels import triton_rope

    block_h = triton_rope.heads_per_program(heads, head_dim)
    const = dict(D=head_dim, BLOCK_H=block_h, HAS_W=True, ROUND_NORMED=paired, PAIRED=paired)
    if not paired:
        const["tab_stride_j"] = 1  # FLUX's (S, D) tables: the JIT specialises a stride of 1
    strides = ("stride_b", "stride_s", "tab_stride_s", "out_stride_b", "out_stride_s")  # multiples of H·D
    ck = _compile(triton_rope._qk_norm_rope_kernel, arch, _ROPE_ARGS, const, strides, num_warps=triton_rope.NUM_WARPS)
    return _usage(ck, arch, 32 * triton_rope.NUM_WARPS, block_h * head_dim)


def norm_kernel_usage(arch: int, dim: int = 3072) -> tuple[float, int, int]:
    """AdaLN's LayerNorm + modulation kernel (triton_norm.py) for FLUX's width: (SASS instructions per element,
    registers, spill bytes)."""
    from pipeline.kernels import triton_norm

    args = [("x_ptr", "*bf16"), ("scale_ptr", "*bf16"), ("shift_ptr", "*bf16"), ("out_ptr", "*bf16"), ("S", "i32"),
            ("N", "i32"), ("stride_xb", "i64"), ("stride_xs", "i32"), ("stride_mod", "i32"), ("eps", "fp32")]
    block, warps = triton_norm.launch_shape(dim)
    aligned = ("N", "stride_xb", "stride_xs", "stride_mod")  # at FLUX's width, multiples of 16
    ck = _compile(triton_norm._adaln_kernel, arch, args, dict(BLOCK=block), aligned, num_warps=warps)
    return _usage(ck, arch, 32 * warps, dim)


def quantize_instructions(arch: int, codes: str) -> tuple[float, collections.Counter]:
    """SASS instructions per activation element of the activation kernel's K loop, and the loop's opcodes."""
    ck = compile_quantize(arch, codes)
    ops = main_loop_instructions(ck.asm["cubin"])
    elements = 32 * kw.INT4_GROUP / (4 * 32)  # BLOCK_M x one group, over 4 warps' threads
    return sum(ops.values()) / elements, ops


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ptxas -v: Triton keeps no log of its own ptxas run without a driver."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        Path(src).write_text(ptx)
        arch_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        log = subprocess.run([str(NVIDIA_BIN / "ptxas"), f"-arch={arch_name}", "-v", src, "-o", out],
                             capture_output=True, text=True, check=True).stderr
    return int(re.search(r"Used (\d+) registers", log).group(1)), int(re.search(r"(\d+) bytes spill stores", log).group(1))


def sass(cubin: bytes) -> tuple[list[str], dict[str, int]]:
    """The kernel's SASS, disassembled once: its instructions in order, and each label's position among them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(NVIDIA_BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    lines, labels = [], {}
    for line in text.splitlines():
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(lines)
        ins = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if ins:
            lines.append(ins.group(1))
    return lines, labels


def main_loop_instructions(cubin: bytes) -> collections.Counter:
    """SASS opcodes of the longest loop that issues tensor-core MMAs (the K loop), one thread's view."""
    return loop_opcodes(*sass(cubin))


def loop_opcodes(lines: list[str], labels: dict[str, int]) -> collections.Counter:
    """main_loop_instructions of a kernel disassembled already (sass)."""
    body: list[str] = []
    for i, ins in enumerate(lines):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", ins)
        if target and labels.get(target.group(1), i + 1) <= i:
            loop = lines[labels[target.group(1)]:i + 1]
            if any("MMA" in x for x in loop) and len(loop) > len(body):
                body = loop
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in body)


def analyse(arch: int, dot: str, index: int, scale_mma=None, expand=None, gelu_quant: bool = False) -> Report:
    """One config on one target; scale_mma and expand default to what w4a4_gemm picks for a bf16 model there.
    gelu_quant: the MLP-first-layer kernel (w4a4_gemm_gelu_quant), INT4 only."""
    config = kw.GEMM_CONFIGS[index]
    if scale_mma is None:
        scale_mma = kw.scale_mma_default(dot, arch, torch.bfloat16, torch.bfloat16)
    if expand is None:
        expand = kw.expand_weights_default(dot, arch)
    on_mma = scale_mma and dot != "fp16"  # NVFP4 scales are fp32 and E4M3: always FP32 multiplies
    expand = expand and dot != "fp16"
    ck = compile_gemm(arch, dot, config, on_mma, expand, gelu_quant=gelu_quant)
    regs, spills = _ptxas_usage(ck.asm["ptx"], arch)
    lines, labels = sass(ck.asm["cubin"])  # disassembled once: the K loop and the instructions outside it
    ops = loop_opcodes(lines, labels)
    c = config.kwargs
    per_group = sum(ops.values())
    warps = config.num_warps
    outside = (len(lines) - per_group) / (c["BLOCK_M"] * c["BLOCK_N"] / (32 * warps))
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    ctas = min(REGS_PER_SM // (regs_per_warp * warps), SMEM_PER_SM[arch] // (ck.metadata.shared + 1024),
               WARPS_PER_SM[arch] // warps)
    group = kw.NVFP4_GROUP if dot == "fp16" else kw.INT4_GROUP
    mma = c["BLOCK_M"] * c["BLOCK_N"] * group / MACS_PER_CLOCK[(arch, dot)]
    tensor = mma + (c["BLOCK_M"] * c["BLOCK_N"] * 16 / MACS_PER_CLOCK[(arch, "fp16")] if on_mma else 0)
    issue = per_group * warps / 4
    fraction = ctas * mma / max(ctas * tensor, ctas * issue, tensor + issue) if ctas else 0.0
    ttgir = ck.asm["ttgir"]
    waits = [int(p) for p in re.findall(r"warp_group_dot_wait.*?pendings = (\d+)", ttgir)]
    name = f"{c['BLOCK_M']}x{c['BLOCK_N']} w{warps} s{config.num_stages}"
    return Report(index, arch, dot, name, "gelu_quant" if gelu_quant else "store", on_mma, expand, regs, spills, ops["LDL"] + ops["STL"], ck.metadata.shared, ctas,
                  ttgir.count("async_copy_global_to_local"), bool(waits) and max(waits) == 0,
                  round(per_group, 1), round(outside, 1), round(fraction, 3), {op: n for op, n in ops.items() if "MMA" in op},
                  dict(ops.most_common(8)))


# What dispatch runs where: INT4 on FP8 (sm_89+) or INT8 (sm_75-86) tensor cores, NVFP4 emulated on FP16.
TARGETS = ["90:fp8", "90:fp16", "80:int8", "80:fp16"]


def main(argv=None) -> list[Report]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", nargs="+", default=TARGETS, help="arch:dot pairs, e.g. 90:fp8 89:fp8 80:int8")
    ap.add_argument("--configs", type=int, default=None, help="only the first N autotune configs")
    ap.add_argument("--scale-mma", choices=["auto", "on", "off", "both"], default="auto",
                    help="form s_a ⊗ s_w on the tensor cores: as w4a4_gemm does for bf16 (auto), always, never, or each")
    ap.add_argument("--expand", choices=["auto", "on", "off", "both"], default="auto",
                    help="weight codes expanded to one per byte before the GEMM: as w4a4_gemm does (auto), always, "
                         "never, or each")
    ap.add_argument("--no-gelu-quant", action="store_true",
                    help="leave out the GELU-quantize GEMM (the MLP's first layer) rows")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    targets = [(int(t.split(":")[0]), t.split(":")[1]) for t in args.targets]
    modes = {"auto": [None], "on": [True], "off": [False], "both": [False, True]}[args.scale_mma]
    expands = {"auto": [None], "on": [True], "off": [False], "both": [False, True]}[args.expand]
    configs = range(len(kw.GEMM_CONFIGS[:args.configs]))
    jobs = [dict(arch=arch, dot=dot, index=i, scale_mma=mode, expand=expand) for arch, dot in targets
            for i in configs for mode in modes for expand in expands]
    if not args.no_gelu_quant:  # the MLP's first layer, as run with the defaults
        jobs += [dict(arch=arch, dot=dot, index=i, gelu_quant=True) for arch, dot in targets if dot != "fp16"
                 for i in configs]
    from pipeline.progress import ItemLog

    lines = ItemLog(len(jobs))  # one stderr line per compile (seconds each): stdout is the table
    reports = []
    for job in jobs:
        reports.append(analyse(**job))
        r = reports[-1]
        lines(f"sm_{r.arch} {r.dot} {r.config} {r.epilogue}")
    header = f"{'arch':>5} {'dot':>5} {'config':<16} {'epilogue':<10} {'sa⊗sw':>5} {'W':>6} {'regs':>4} {'spill':>5} {'in loop':>7} {'smem KB':>7} " \
             f"{'CTA/SM':>6} {'instr/group':>11} {'out/elem':>8} {'est. of peak':>12}"
    print(header)
    for r in reports:
        print(f"{'sm_' + str(r.arch):>5} {r.dot:>5} {r.config:<16} {r.epilogue:<10} {'MMA' if r.scale_mma else 'FP32':>5} "
              f"{'bytes' if r.expand_weights else 'packed':>6} "
              f"{r.registers:>4} {r.spill_bytes:>5} {r.loop_spills:>7} {r.shared_bytes / 1024:>7.0f} {r.ctas_per_sm:>6} "
              f"{r.instructions_per_group:>11.0f} {r.outside_loop_per_element:>8.1f} {r.est_peak_fraction:>12.0%}")
    for arch, dot in targets:
        if dot != "fp16":
            per_element, _ = quantize_instructions(arch, kw.act_code_format(dot))
            print(f"activation kernel, sm_{arch} {dot} codes: {per_element:.0f} instructions per element")
    for arch in sorted({arch for arch, _ in targets}, reverse=True):
        for model, paired in (("FLUX", False), ("Qwen-Image", True)):
            per_element, regs, spills = rope_kernel_usage(arch, paired)
            print(f"q/k norm + RoPE kernel, sm_{arch} {model}: {per_element:.0f} instructions per element, "
                  f"{regs} registers, {spills} bytes spilled")
        per_element, regs, spills = norm_kernel_usage(arch)
        print(f"AdaLN norm + modulation kernel, sm_{arch} FLUX: {per_element:.0f} instructions per element, "
              f"{regs} registers, {spills} bytes spilled")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=1))
    return reports


if __name__ == "__main__":
    main()
