"""FLUX single blocks join the text and image streams the previous single block returned as slices of its
output without copying them (fused_mlp.joined); anything else is torch.cat."""

from __future__ import annotations

import pytest
import torch

from pipeline.quantization import fused_mlp
from pipeline.quantization.fused_mlp import joined


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


@pytest.mark.parametrize("batch", [1, 3])
def test_adjacent_slices_of_one_tensor_join_without_a_copy(batch):
    whole = torch.randn(batch, 11, 6, generator=torch.Generator().manual_seed(0))
    got = joined(whole[:, :4], whole[:, 4:])
    assert torch.equal(got, torch.cat([whole[:, :4], whole[:, 4:]], dim=1))
    assert _same_storage(got, whole) and got.data_ptr() == whole.data_ptr()


def test_a_view_of_a_wider_tensor_keeps_its_offset():
    base = torch.arange(2 * 9 * 5, dtype=torch.float32).reshape(2, 9, 5)
    whole = base[1:]  # storage offset 45
    got = joined(whole[:, :2], whole[:, 2:])
    assert _same_storage(got, base) and torch.equal(got, whole)


@pytest.mark.parametrize("case", ["separate", "swapped", "gap", "other-image", "width-slices", "requires-grad",
                                  "dtypes", "copied-text"])
def test_anything_else_is_a_copy_equal_to_torch_cat(case):
    g = torch.Generator().manual_seed(1)
    whole = torch.randn(2, 10, 4, generator=g)
    grad = whole.clone().requires_grad_()
    first, second = {
        "separate": (torch.randn(2, 3, 4, generator=g), torch.randn(2, 7, 4, generator=g)),
        "swapped": (whole[:, 3:], whole[:, :3]),
        "gap": (whole[:, :3], whole[:, 4:]),
        "other-image": (whole[:1, :3], whole[1:, 3:]),  # text of image 0, image tokens of image 1
        "width-slices": (whole[:, :3, :2], whole[:, 3:, :2]),
        "requires-grad": (grad[:, :3], grad[:, 3:]),
        "dtypes": (whole[:, :3], whole.double()[:, 3:]),
        "copied-text": (whole[:1, :3].clone(), whole[:1, 3:]),  # offsets and strides fit, another tensor
    }[case]
    got = joined(first, second)
    assert torch.equal(got, torch.cat([first, second], dim=1))
    assert not _same_storage(got, first) and not _same_storage(got, second)


def test_every_single_block_after_the_first_joins_its_streams_without_a_copy(monkeypatch):
    """Tiny FLUX (2 single blocks), INT4 on the reference path: the first single block's streams come from the
    double blocks (a copy), the second's from the first single block (no copy); the output is bit for bit the
    one with torch.cat."""
    from test_checkpoint import quantized_pipe, transformer_inputs

    transformer = quantized_pipe("tiny-flux", "int4").transformer
    from pipeline.families.flux.fused import FusedMLPFluxSingleTransformerBlock

    assert all(type(b) is FusedMLPFluxSingleTransformerBlock for b in transformer.single_transformer_blocks)
    copies = []

    def spied(first, second):
        out = joined(first, second)
        copies.append(not _same_storage(out, first))
        return out

    monkeypatch.setenv("SVDQ_KERNELS", "reference")
    kw = transformer_inputs("tiny-flux")
    with torch.no_grad():
        monkeypatch.setattr(fused_mlp, "joined", spied)
        out = transformer(**kw).sample
        monkeypatch.setattr(fused_mlp, "joined", lambda a, b: torch.cat([a, b], dim=1))
        expected = transformer(**kw).sample
    assert copies == [True] + [False] * (len(transformer.single_transformer_blocks) - 1)
    assert len(copies) >= 2 and torch.equal(out, expected)
