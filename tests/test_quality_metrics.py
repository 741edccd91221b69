"""pipeline.quality.metrics: closed-form PSNR/SSIM/MS-SSIM values, skipped metrics, missing weight paths."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.quality.metrics import Metrics, MetricUnavailable, ms_ssim_settings, pair_metrics


def grey(value=128, size=(128, 128)):
    return Image.new("RGB", size, (value, value, value))


def noisy(sigma, seed=0, size=128):
    rng = np.random.default_rng(seed)
    arr = np.clip(np.round(128 + rng.normal(0.0, sigma, (size, size, 3))), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def cfg(**kw):
    base = dict(lpips_weights=None, inception_weights=None, fid_reference=None, clip_model=None, image_reward=False)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("size", [64, 128, 176])
def test_identical_images(size):
    img = noisy(20, seed=1, size=size)
    m = pair_metrics(img, img.copy())
    assert m["psnr"] == math.inf
    assert m["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert m["ms_ssim"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("d", [1, 10, 50])
def test_uniform_shift_psnr_exact(d):
    m = pair_metrics(grey(128, (64, 64)), grey(128 + d, (64, 64)))
    assert m["psnr"] == pytest.approx(20 * math.log10(255 / d), abs=1e-6)
    assert m["ssim"] < 1 and m["ms_ssim"] < 1


def test_gaussian_noise_psnr_and_ssim_order():
    ref = grey(128)
    ssims = []
    for sigma in (5, 10, 20):
        m = pair_metrics(ref, noisy(sigma, seed=sigma))
        assert m["psnr"] == pytest.approx(20 * math.log10(255 / sigma), abs=0.1)
        assert m["ssim"] < 1 and m["ms_ssim"] < 1
        ssims.append(m["ssim"])
    assert ssims[0] > ssims[1] > ssims[2]


def test_ms_ssim_small_images_use_fewer_scales():
    assert len(ms_ssim_settings(256, 256)[0]) == 5
    assert len(ms_ssim_settings(128, 128)[0]) == 4
    assert len(ms_ssim_settings(64, 64)[0]) == 3
    for size in (176, 128, 64, 32):
        betas, _ = ms_ssim_settings(size, size)
        assert sum(betas) == pytest.approx(1.0)
    assert pair_metrics(noisy(10, size=64), grey(128, (64, 64)))["ms_ssim"] is not None


def test_different_sizes_name_both():
    with pytest.raises(ValueError, match=r"128x128.*64x96"):
        pair_metrics(grey(size=(128, 128)), grey(size=(64, 96)))


def test_metrics_all_unconfigured():
    m = Metrics(cfg())
    assert set(m.skipped) == {"lpips", "fid", "clip_score", "image_reward"}
    assert m.skipped["lpips"].startswith("not configured: set report.lpips_weights=")
    assert m.skipped["fid"].startswith("not configured: set report.inception_weights=")
    assert m.skipped["clip_score"].startswith("not configured: set report.clip_model=")
    assert m.skipped["image_reward"].startswith("not configured: set report.image_reward=true")
    out = m.pair(grey(128), grey(130))
    assert set(out) == {"psnr", "ssim", "ms_ssim"}
    assert m.fid([], []) is None
    assert m.clip_score([], []) is None
    assert m.image_reward([], []) is None


@pytest.mark.parametrize("key,needs", [
    ("lpips_weights", "LPIPS needs the AlexNet LPIPS weights (torchmetrics/lpips 'alex'"),
    ("inception_weights", "FID needs the FID Inception weights file pt_inception-2015-12-05-6726825d.pth"),
    ("clip_model", "CLIP score needs a local CLIP model folder in transformers format"),
])
def test_set_but_missing_path(tmp_path, key, needs):
    missing = tmp_path / "nope" / "weights.pth"
    with pytest.raises(MetricUnavailable) as info:
        Metrics(cfg(**{key: str(missing)}))
    msg = str(info.value)
    kind = "folder" if key == "clip_model" else "file"
    assert msg.startswith(f"report.{key}={missing}: no such {kind}. {needs}")
    assert "on a machine with internet" in msg and f"report.{key}" in msg.split(". ", 1)[1]
    assert isinstance(info.value, PipelineError)


def test_lpips_message_exact(tmp_path):
    with pytest.raises(MetricUnavailable) as info:
        Metrics(cfg(lpips_weights="/x/alex.pth"))
    assert str(info.value) == (
        "report.lpips_weights=/x/alex.pth: no such file. LPIPS needs the AlexNet LPIPS weights (torchmetrics/lpips "
        "'alex': torchvision's alexnet-owt-7be5be79.pth backbone, with the linear layers from torchmetrics' bundled "
        "lpips_models/alex.pth); download them on a machine with internet and point report.lpips_weights at the "
        "file (or a folder holding it)")


def test_lpips_from_local_backbone_file(tmp_path):
    from pipeline.quality.lpips_alex import AlexLPIPS

    torch.manual_seed(0)
    backbone = {f"features.{k}": v for k, v in AlexLPIPS().features.state_dict().items()}
    backbone["classifier.1.weight"] = torch.zeros(2, 2)  # torchvision files carry the classifier too: ignored
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(backbone, path)
    m = Metrics(cfg(lpips_weights=str(path)))
    assert "lpips" not in m.skipped
    same = m.pair(noisy(20, seed=3, size=64), noisy(20, seed=3, size=64))
    assert same["lpips"] == pytest.approx(0.0, abs=1e-6)
    near = m.pair(noisy(20, seed=3, size=64), noisy(20, seed=4, size=64))["lpips"]
    far = m.pair(noisy(20, seed=3, size=64), grey(255, (64, 64)))["lpips"]
    assert 0 < near and 0 < far


def test_lpips_unusable_file(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"something": torch.zeros(1)}, path)
    with pytest.raises(MetricUnavailable, match=r"report.lpips_weights=.*bad.pth: cannot be used: .*no AlexNet"):
        Metrics(cfg(lpips_weights=str(path)))


def test_fid_without_torch_fidelity(tmp_path):
    pytest.importorskip("torchmetrics")
    try:
        import torch_fidelity  # noqa: F401
        pytest.skip("torch-fidelity is installed here")
    except ImportError:
        pass
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"x")
    m = Metrics(cfg(inception_weights=str(weights)))
    assert m.skipped["fid"].endswith("pip install torch-fidelity")
    assert m.fid([weights, weights], [weights, weights]) is None


def test_lpips_matches_torchmetrics_network(tmp_path, monkeypatch):
    """Same numbers as torchmetrics' _LPIPS('alex') given the same backbone (torchvision swapped for ours)."""
    import torchmetrics.functional.image.lpips as tm_lpips

    from pipeline.quality.lpips_alex import AlexLPIPS, _features

    torch.manual_seed(1)
    backbone = _features()
    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", lambda net, pretrained=False: backbone)
    reference = tm_lpips._LPIPS(pretrained=True, net="alex").eval()  # linear layers: torchmetrics' bundled alex.pth
    path = tmp_path / "lpips_alex_full.pth"
    torch.save(reference.state_dict(), path)  # net.sliceK.N.* + lin*.model.*: the "LPIPS state dict" form
    ours = AlexLPIPS.from_path(path)
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(a, b, normalize=True).flatten()
    assert torch.allclose(ours(a, b), expected, rtol=1e-5, atol=1e-6)
