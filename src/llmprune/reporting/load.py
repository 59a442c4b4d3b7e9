"""Collect the runs a comparison report is made of.

A RUN argument is one of:

- a run folder (it holds ``llmprune.json``, written by ``llmprune prune``);
- a sweep folder (it holds ``sweep.json``, written by ``llmprune sweep``): expanded to its finished
  points, in order;
- a JSON file: an ``llmprune.json`` or the output of ``llmprune eval --json`` (no ``method``: shown as
  method ``eval``).

An ``llmprune eval`` report of a run folder carries that run's record in its ``run`` section (method,
recipe, calibration, structure, base model): it is compared as that run, so a structured run sits
at its removed parameter fraction and beside its base model, not at sparsity 0 as a model of its own.

Everything is read and checked before the report writes anything; a bad argument is an
:class:`~llmprune.errors.LLMPruneError` naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LLMPruneError
from ..io.save import REPORT_NAME, SWEEP_NAME, read_report


@dataclass(eq=False)
class Run:
    """One report to compare: a unique ``label`` (its row name), where it came from and its contents."""

    label: str
    source: Path
    report: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.report.get("method", "eval"))

    @property
    def is_eval(self) -> bool:
        """An ``llmprune eval --json`` report (no pruning recorded)."""
        return "method" not in self.report

    @property
    def structured(self) -> bool:
        return "structure" in self.report


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise LLMPruneError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise LLMPruneError(f"{path} is not valid JSON: {exc}") from None


def _check_report(report: Any, where: Path) -> dict[str, Any]:
    if not isinstance(report, dict) or "model" not in report:
        raise LLMPruneError(f"{where} is not an llmprune report (no 'model' field); expected an {REPORT_NAME} "
                            f"or the output of `llmprune eval --json`")
    if "method" not in report and "eval" not in report and "zeroshot" not in report:
        raise LLMPruneError(f"{where} has neither a method nor evaluation results; it is not an llmprune report")
    return _as_run(report)


# what an eval report takes over from the run folder it evaluated (api.evaluate's ``run`` section)
RUN_KEYS = ("method", "recipe", "calibration", "structure", "sparsity")


def _as_run(report: dict[str, Any]) -> dict[str, Any]:
    """An eval report of a run folder, seen as that run (module docstring); any other report as it is."""
    run = report.get("run")
    if "method" in report or not isinstance(run, dict) or "method" not in run:
        return report
    out = {**report, **{k: run[k] for k in RUN_KEYS if run.get(k) is not None}}
    out["model"] = run.get("base_model", report["model"])
    out["evaluated"] = report["model"]
    return out


def _sweep_runs(folder: Path, notes: list[str]) -> list[Run]:
    sweep = _read_json(folder / SWEEP_NAME)
    points = sweep.get("points") if isinstance(sweep, dict) else None
    if not isinstance(points, list) or not points:
        raise LLMPruneError(f"{folder / SWEEP_NAME} lists no points; it is not an llmprune sweep folder")
    runs, unfinished = [], []
    for point in points:
        if not isinstance(point, dict) or "folder" not in point:
            raise LLMPruneError(f"{folder / SWEEP_NAME}: point {point!r} names no folder")
        if point.get("status", "done") != "done":  # an interrupted sweep: its finished points still compare
            unfinished.append(str(point["folder"]))
            continue
        run_dir = folder / str(point["folder"])
        runs.append(Run(f"{folder.name}/{point['folder']}", run_dir, _check_report(read_report(run_dir), run_dir)))
    if not runs:
        raise LLMPruneError(f"sweep {folder} has no finished point yet")
    if unfinished:
        notes.append(f"sweep {folder.name} is not finished; its unfinished points are left out: {', '.join(unfinished)}")
    return runs


def collect_runs(paths: list[str | os.PathLike[str]], notes: list[str] | None = None) -> list[Run]:
    """Read every RUN argument (folders, sweeps, JSON files) into :class:`Run` objects with unique labels.

    Points of a sweep that are not finished yet are left out, with a line in ``notes`` saying so.
    """
    notes = [] if notes is None else notes
    if not paths:
        raise LLMPruneError("name at least one run folder, sweep folder or report JSON file")
    runs: list[Run] = []
    for arg in paths:
        path = Path(arg).expanduser().resolve()
        if not path.exists():
            raise LLMPruneError(f"{path} does not exist")
        if path.is_dir() and (path / SWEEP_NAME).is_file() and not (path / REPORT_NAME).is_file():
            runs.extend(_sweep_runs(path, notes))
        elif path.is_dir():
            runs.append(Run(path.name, path, _check_report(read_report(path), path)))
        else:
            label = path.parent.name if path.name == REPORT_NAME else path.stem
            runs.append(Run(label, path, _check_report(_read_json(path), path)))
    seen: dict[str, int] = {}
    for run in runs:  # two runs may share a folder name (e.g. out/a and other/a): number the repeats
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} #{seen[run.label]}"
    return runs
