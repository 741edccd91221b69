#!/usr/bin/env bash
# Issue #4's GPU work on a lent GPU machine, in as few device calls as fit its 10-minute limit.
# Here first: `make gpu-wheels` (diffusers, hydra, omegaconf, antlr4, bitsandbytes into .whl/). Then:
#   run(command="bash benchmarks/device_run.sh tests", carry=[".whl"])
#   run(command="bash benchmarks/device_run.sh gemm", carry=[".whl"])   (autotunes 3 kernel variants per shape)
#   run(command="bash benchmarks/device_run.sh flux", carry=[".whl"])
#   run(command="bash benchmarks/device_run.sh qwen", carry=[".whl"])
#   run(command="bash benchmarks/device_run.sh flux-ablations", carry=[".whl"])   (each fusion off in turn, eager)
# and merge what came back:
#   python benchmarks/gpu_bench.py --report <gemm.json> <flux.json> <qwen.json> [<flux-ablations.json>] \
#       --out docs/benchmarks.json --markdown docs/benchmarks.md
# Parts: tests (GPU tests: kernels vs reference, tiny pipeline vs reference path), gemm, flux, qwen, and
# flux-ablations / qwen-ablations (the default INT4 forward with each fusion off in turn; the main parts
# measure the ablations last, after torch.compile, so a time budget may cut them there).
# A device call is killed at 600 s, so each part stops itself first: the benchmark starts no new
# measurement after BUDGET_S (its JSON, rewritten after every row, then says it is incomplete), and
# LIMIT_S interrupts whatever still runs, before the hard kill, so the files and the log come back.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/device}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "could not install the carried wheels (.whl/): run 'make gpu-wheels' here and carry .whl" >&2; exit 3; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
status=0
GPU_TESTS="tests/test_kernels.py tests/test_rope_kernel.py tests/test_norm_kernel.py tests/test_gated_epilogue.py
  tests/test_joint_qkv.py tests/test_joined_streams.py tests/test_numerics.py tests/test_kernel_selfcheck.py"
for part in "$@"; do
  case "$part" in
    tests) timeout -s INT -k 15 "${LIMIT_S:-570}" \
             python3 -m pytest -q -p no:cacheprovider $GPU_TESTS 2>&1 \
             | tee "$OUT/tests.txt" || status=1 ;;
    gemm|flux|qwen) timeout -s INT -k 15 "${LIMIT_S:-570}" \
             python3 benchmarks/gpu_bench.py --only "$part" --profile --out "$OUT/$part.json" \
             --time-budget-s "${BUDGET_S:-450}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/$part.txt" || status=1 ;;
    flux-ablations|qwen-ablations) model=${part%-ablations}; timeout -s INT -k 15 "${LIMIT_S:-570}" \
             python3 benchmarks/gpu_bench.py --only "$model" --no-compile --out "$OUT/$part.json" \
             --variants int4_r32,int4_r32_unfused-rope,int4_r32_unfused-mlp,int4_r32_unfused-norm,int4_r32_unfused-gate,int4_r32_unfused \
             --time-budget-s "${BUDGET_S:-450}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/$part.txt" || status=1 ;;
    *) echo "unknown part '$part' (tests | gemm | flux | qwen | flux-ablations | qwen-ablations)" >&2; exit 2 ;;
  esac
done
exit $status
