"""Image-quality metrics for the report: PSNR/SSIM/MS-SSIM always; LPIPS, FID, CLIP score, ImageReward from local weights."""

from pipeline.quality.metrics import Metrics, MetricUnavailable, ms_ssim_settings, pair_metrics

__all__ = ["Metrics", "MetricUnavailable", "ms_ssim_settings", "pair_metrics"]
