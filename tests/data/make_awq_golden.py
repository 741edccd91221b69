"""Regenerate tests/data/golden_awq.safetensors: AWQ W4A16 tensors packed by DeepCompressor's own code.

    python tests/data/make_awq_golden.py --deepcompressor /path/to/deepcompressor-checkout

Why: our AWQ packer for the AdaLN modulation layers must write exactly what DeepCompressor's
Nunchaku writer writes, so the reference comes from running that writer, not from our reading of it.
The function called is `convert_to_nunchaku_w4x16_linear_weight`
(deepcompressor/backend/nunchaku/utils.py:341-368 at commit 69f3473), which interleaves the output
channels by modulation split, folds the AdaLN "+1" into the bias of the scale chunks (lines 356-363),
and packs with TinyChat's `convert_to_tinychat_w4x16y16_linear_weight` / `pack_w4` /
`ceil_num_groups` (deepcompressor/backend/tinychat/utils.py:11-107).

Import: only the two package shells `deepcompressor` and `deepcompressor.backend` are replaced by
empty modules whose __path__ points into the checkout, so their __init__ files never run; every
module that is executed (backend/utils.py, backend/tinychat/utils.py, backend/nunchaku/utils.py and
the empty nunchaku/ and tinychat/ package __init__ files) is DeepCompressor's own, and needs only
torch and safetensors.

Inputs are fixed integer patterns (no randomness): codes q in 0..15, scales s = k/64 (k in 1..8) and
weight = (q - 7) * s in bf16, all exactly representable, so DeepCompressor recovers q exactly.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).with_name("golden_awq.safetensors")
KNOWN_COMMIT = "69f3473f5e1c1504bae35cc50c7858ef900a9b17"
FUNCTION = "deepcompressor/backend/nunchaku/utils.py::convert_to_nunchaku_w4x16_linear_weight"

# name -> (adanorm_splits, out_features, in_features, what the case shows)
CASES = {
    "adanorm_zero": (6, 768, 256, "AdaLayerNormZero (6 chunks); 4 real 64-groups, padded by ceil_num_groups"),
    "adanorm_single": (3, 384, 256, "AdaLayerNormZeroSingle (3 chunks); 4 real 64-groups"),
    "adanorm_single_k128": (3, 384, 128, "one 64-group pair (K=128): group padding at its largest"),
    "plain_k1024": (1, 128, 1024, "adanorm_splits=1 (no interleave, no +1); 16 groups, no padding"),
}


def import_deepcompressor_awq(checkout: Path):
    """DeepCompressor's AWQ converter, imported without running its top-level package __init__ files."""
    for name, folder in (("deepcompressor", checkout / "deepcompressor"),
                         ("deepcompressor.backend", checkout / "deepcompressor" / "backend")):
        if not folder.is_dir():
            raise SystemExit(f"not a DeepCompressor checkout: {folder} is missing")
        shell = types.ModuleType(name)
        shell.__path__ = [str(folder)]
        sys.modules[name] = shell
    from deepcompressor.backend.nunchaku.utils import convert_to_nunchaku_w4x16_linear_weight
    from deepcompressor.backend.tinychat.utils import ceil_num_groups

    return convert_to_nunchaku_w4x16_linear_weight, ceil_num_groups


def checkout_commit(checkout: Path, given: str | None) -> str:
    """The commit the checkout is at: from git when it is a work tree, else as given (default: the known one)."""
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{KNOWN_COMMIT} (not a git work tree; assumed)"


def logical_inputs(n: int, k: int, case_index: int):
    """Codes (N, K) uint8 in 0..15, scales (N, K/64) bf16 and bias (N,) bf16, chunk-major like diffusers' Linear."""
    rows = torch.arange(n).view(n, 1)
    cols = torch.arange(k).view(1, k)
    codes = ((rows * 7 + cols * 3 + rows // 5 + case_index) % 16).to(torch.uint8)
    groups = torch.arange(k // 64).view(1, -1)
    scales = ((1 + (rows * 3 + groups * 5 + case_index) % 8).to(torch.float32) / 64).to(torch.bfloat16)
    bias = (((torch.arange(n) + case_index) % 17 - 8).to(torch.float32) / 32).to(torch.bfloat16)
    return codes, scales, bias


def dequantized_weight(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """weight = (q - 7) * s in bf16; exact because |q - 7| <= 8 and s has a 3-bit mantissa."""
    n, k = codes.shape
    per_column = scales.to(torch.float32).repeat_interleave(64, dim=1)
    weight = (codes.to(torch.float32) - 7) * per_column
    exact = weight.to(torch.bfloat16)
    assert torch.equal(exact.to(torch.float32), weight), "weights must be exact in bf16"
    return exact


def sort_header_metadata(path: Path) -> None:
    """safetensors writes __metadata__ from a hash map in random order; sort it so reruns give identical bytes."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size, "re-serialised header must fit the original padded header"
    path.write_bytes(data[:8] + text.ljust(size, b" ") + data[8 + size :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deepcompressor", type=Path, required=True, help="DeepCompressor source checkout")
    parser.add_argument("--commit", default=None, help="commit of the checkout when it is not a git work tree")
    args = parser.parse_args()
    convert, ceil_num_groups = import_deepcompressor_awq(args.deepcompressor.resolve())

    tensors: dict[str, torch.Tensor] = {}
    cases_meta = {}
    for index, (name, (splits, n, k, what)) in enumerate(CASES.items()):
        codes, scales, bias = logical_inputs(n, k, index)
        weight = dequantized_weight(codes, scales)
        # DeepCompressor adds the "+1" to the bias in place through a view (utils.py:359-362): pass a copy.
        qweight, wscales, wzeros, out_bias = convert(
            weight=weight, scale=scales.view(n, 1, k // 64, 1), zero=None, bias=bias.clone(), adanorm_splits=splits)
        tensors.update({
            f"{name}.codes": codes, f"{name}.scales": scales, f"{name}.bias": bias,
            f"{name}.dc.qweight": qweight, f"{name}.dc.wscales": wscales,
            f"{name}.dc.wzeros": wzeros, f"{name}.dc.bias": out_bias,
        })
        cases_meta[name] = {
            "adanorm_splits": splits, "out_features": n, "in_features": k, "groups": k // 64,
            "stored_groups": ceil_num_groups(k, 64, weight_bits=4), "shows": what,
            "shapes": {key: list(t.shape) for key, t in (("qweight", qweight), ("wscales", wscales),
                                                        ("wzeros", wzeros), ("bias", out_bias))},
        }
        print(f"{name}: qweight {tuple(qweight.shape)} {qweight.dtype}, wscales/wzeros {tuple(wscales.shape)} "
              f"{wscales.dtype} ({k // 64} real groups), bias {tuple(out_bias.shape)}")

    metadata = {
        "source": "DeepCompressor (mit-han-lab/deepcompressor)",
        "deepcompressor_commit": checkout_commit(args.deepcompressor, args.commit),
        "function": FUNCTION,
        "call": "convert(weight=(codes-7)*scales bf16 (N,K), scale=scales.view(N,1,K/64,1), zero=None, "
                "bias=bias.clone(), adanorm_splits=S)",
        "layout": "<case>.codes/.scales/.bias: logical inputs, chunk-major rows as diffusers' Linear; "
                  "<case>.dc.*: DeepCompressor's return values (qweight, wscales, wzeros, bias) unchanged",
        "cases": json.dumps(cases_meta, sort_keys=True),
    }
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(OUT), metadata=metadata)
    sort_header_metadata(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
