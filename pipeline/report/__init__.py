"""The quality report of a sweep (or of one run against a reference run): `python -m pipeline.report DIR`.

Writes DIR/report/: index.html (static, works offline), metrics.json, metrics.csv, plots (PNG + SVG), thumbs/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pipeline.config.schema import ReportConfig


def build_report(folder: Path, cfg: Optional[ReportConfig] = None, reference: Optional[str] = None) -> Path:
    """Compare every variant in `folder` with the reference; return the path of report/index.html."""
    from pipeline.report.collect import collect
    from pipeline.report.html import write_html
    from pipeline.report.plots import write_plots
    from pipeline.report.tables import write_tables

    cfg = cfg or ReportConfig()
    folder = Path(folder).resolve()
    out = folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    data = collect(folder, cfg, reference or cfg.reference, out)
    write_tables(data, out)
    data["plots"] = write_plots(data, out)
    return write_html(data, cfg, out)
