"""python -m pipeline.report DIR [--reference RUN_DIR] [report.key=value ...]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_config(overrides: list[str]):
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.config.schema import ReportConfig

    dots = [o[len("report."):] if o.startswith("report.") else o for o in overrides]
    bad = [o for o in dots if "=" not in o]
    if bad:
        raise ValueError(f"overrides must be report.key=value, got {' '.join(bad)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ReportConfig), OmegaConf.from_dotlist(dots))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ValueError(str(e).splitlines()[0]) from None
    problems = cfg.check()
    if problems:
        raise ValueError("; ".join(f"{k}: {m}" for k, m in problems))
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.report",
                                description="Quality report: each variant's images against the reference's.")
    p.add_argument("dir", type=Path, help="a sweep folder (job subfolders with run.json) or one run folder")
    p.add_argument("--reference", help="the reference run folder (default: the sweep's quantization=none job)")
    p.add_argument("overrides", nargs="*", help="report.key=value (see ReportConfig), e.g. report.worst_k=4")
    args = p.parse_intermixed_args(argv)
    from pipeline.report import build_report
    from pipeline.report.collect import ReportError

    try:
        cfg = parse_config(args.overrides)
        index = build_report(args.dir, cfg, args.reference)
    except (ValueError, ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
