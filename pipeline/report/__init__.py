"""`distill report`: one self-contained HTML page over finished runs (`runs`) or over one sweep's
trials (`sweep`), built from the blocks in `html`. Reads result.json files and manifests only."""

from pipeline.report.runs import group_of, reliability, write_report
from pipeline.report.sweep import is_sweep, write_sweep_report

__all__ = ["group_of", "reliability", "write_report", "is_sweep", "write_sweep_report"]
