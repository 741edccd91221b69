"""svdq-batch: batch image generation with 4-bit SVDQuant diffusion transformers, configured by Hydra.

Layout: config/ (schema + validation), manifest.py (prompt lists), models/ (building pipelines),
quantization/ (SVDQuant plan and the call that applies it), tasks.py (rows -> image tasks),
runner.py (one job; generate.py, record.py, ranks.py beside it), outputs/ (files a run writes),
sweep.py (multirun summary), cli.py (entry).
"""

__version__ = "0.1.0"

import logging as _logging


class _DropTorchvisionNotice(_logging.Filter):
    """transformers warns that image processors fall back to PIL without torchvision; we use none."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionNotice())
