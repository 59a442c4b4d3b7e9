"""Comparison reports over pruning runs: ``llmprune report RUN... --output DIR``.

:func:`build_report` reads run folders, sweep folders and report JSON files (:mod:`.load`), builds
one comparison table with evaluation settings kept apart (:mod:`.tables`), draws the plots
(:mod:`.plots`, needs ``pip install llmprune[report]``) and writes ``report.md``, a self-contained
``report.html``, the PNGs and ``report.json`` into the output folder (:mod:`.build`).
"""

from __future__ import annotations

from .build import ReportResult, build_report
from .load import Run, collect_runs

__all__ = ["ReportResult", "Run", "build_report", "collect_runs"]
