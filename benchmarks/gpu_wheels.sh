#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (it has torch, triton, transformers, tokenizers, accelerate,
# safetensors, rich, pillow, pyyaml): carry .whl/ with the device tool and install them there with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
$PY -m pip download -q --no-deps "${plat[@]}" -d .whl "diffusers==0.42.1" "hydra-core==1.3.8" "omegaconf==2.3.1"
$PY -m pip download -q --no-deps "${plat[@]}" -d .whl "bitsandbytes" || echo "bitsandbytes: no wheel; NF4 rows will be skipped"
$PY -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3"  # sdist only: build the pure-Python wheel here
ls -la .whl
du -sh .whl
