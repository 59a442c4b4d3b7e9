"""Assemble the report folder: ``report.md``, a self-contained ``report.html``, the PNG plots and ``report.json``."""

from __future__ import annotations

import base64
import html
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LLMPruneError
from ..io.save import check_output_dir, staged_dir, write_json_atomic
from .load import Run, collect_runs
from .plots import PlotSpec, Series, plot_specs, pyplot, render
from .tables import Comparison, compare, html_table, markdown_table

DEFAULT_TITLE = "llmprune comparison report"

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: top; }
th { background: #f3f3f3; text-align: left; } td.num, th.num { text-align: right; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafafa; }
.warning { background: #fff4e5; border-left: 5px solid #e69500; padding: 0.6em 1em; margin: 0.6em 0; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .meta { color: #555; font-size: 0.9em; }
"""


@dataclass
class ReportResult:
    output: Path
    runs: list[Run]
    comparison: Comparison
    plots: list[tuple[PlotSpec, Series]] = field(default_factory=list)  # each spec with the series it drew
    files: list[Path] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return self.comparison.warnings


def _version() -> str:
    import importlib.metadata as md

    try:
        return md.version("llmprune")
    except md.PackageNotFoundError:
        return "?"


def _markdown(title: str, meta: str, comp: Comparison, plots: list[PlotSpec]) -> str:
    out = [f"# {title}", "", meta, ""]
    for warning in comp.warnings:
        out += [f"> **Warning:** {warning}", ""]
    out += ["## Runs", "", markdown_table(comp.columns), ""]
    if comp.settings:
        out += ["## Evaluation settings", "", *[f"- {line}" for line in comp.settings], ""]
    if plots:
        out += ["## Plots", ""]
        for spec in plots:
            lines = ", ".join(f"`{label}`" for label in spec.series)
            out += [f"### {spec.title}", "", f"![{spec.title}]({spec.file})", "", f"Lines: {lines}.", ""]
    out += ["## Sources", "", *[f"- `{run.label}`: `{run.source}`" for run in comp.runs], ""]
    return "\n".join(out)


def _html(title: str, meta: str, comp: Comparison, plots: list[PlotSpec], folder: Path) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>", f'<p class="meta">{e(meta)}</p>']
    out += [f'<div class="warning"><strong>Warning:</strong> {e(w)}</div>' for w in comp.warnings]
    out += ["<h2>Runs</h2>", f'<div class="scroll">{html_table(comp.columns)}</div>']
    if comp.settings:
        out += ["<h2>Evaluation settings</h2>", "<ul>", *[f"<li>{e(line)}</li>" for line in comp.settings], "</ul>"]
    if plots:
        out.append("<h2>Plots</h2>")
        for spec in plots:
            data = base64.b64encode((folder / spec.file).read_bytes()).decode("ascii")
            lines = ", ".join(spec.series)
            out.append(f'<figure><img alt="{e(spec.title)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{e(spec.title)}. Lines: {e(lines)}.</figcaption></figure>")
    out += ["<h2>Sources</h2>", "<ul>", *[f"<li><code>{e(r.label)}</code>: <code>{e(str(r.source))}</code></li>"
                                          for r in comp.runs], "</ul>", "</body></html>", ""]
    return "\n".join(out)


def build_report(runs: list[str | os.PathLike[str]], output: str | os.PathLike[str], *, title: str | None = None,
                 overwrite: bool = False) -> ReportResult:
    """Compare run folders, sweep folders or report JSON files; write the report folder ``output``.

    Every input is read and checked, and ``output`` checked (an existing folder is refused unless
    ``overwrite``), before anything is written; the folder is built beside ``output`` and moved into
    place whole.
    """
    notes: list[str] = []
    collected = collect_runs(list(runs), notes)
    dest = check_output_dir(output, overwrite).resolve()
    for run in collected:
        if run.source == dest or dest in run.source.parents:
            raise LLMPruneError(f"--output {dest} would replace the input {run.source}; choose another folder")
    comp = compare(collected)
    comp.warnings[:0] = notes
    specs = plot_specs(collected)
    if specs:
        pyplot()  # fail now, not halfway, if matplotlib is missing
    title = title or DEFAULT_TITLE
    meta = (f"{len(collected)} runs compared; generated by llmprune {_version()} on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    result = ReportResult(Path(output).expanduser(), collected, comp)
    with staged_dir(output, overwrite=overwrite) as tmp:
        for spec in specs:
            result.plots.append((spec, render(spec, tmp / spec.file)))
        (tmp / "report.md").write_text(_markdown(title, meta, comp, specs), encoding="utf-8")
        (tmp / "report.html").write_text(_html(title, meta, comp, specs, tmp), encoding="utf-8")
        write_json_atomic(tmp / "report.json", {
            "title": title,
            "runs": [{"label": r.label, "source": str(r.source)} for r in collected],
            "warnings": comp.warnings,
            "settings": comp.settings,
            "columns": [{"header": c.header, "cells": c.cells} for c in comp.columns],
            "plots": [{"file": s.file, "title": s.title, "xlabel": s.xlabel, "ylabel": s.ylabel, "series": drawn}
                      for s, drawn in result.plots],
        })
        names = sorted(p.name for p in tmp.iterdir())
    result.files = [result.output / name for name in names]
    return result
