"""Re-run a run from its folder: ``llmprune prune --recipe RUN_DIR`` (or ``RUN_DIR/llmprune.json``).

The report's ``recipe`` is the fully resolved recipe (every method option, the calibration and
evaluation settings, the seed), so it is the recipe of the re-run, less what names this machine's
folders: ``output`` and ``data_dir`` are not published (:mod:`llmprune.io.public`), and give the
re-run's own. Flags on the command line override it as they override any recipe.

A run that read local inputs records them by name only (a folder's or a file's name); when such a
name does not resolve here, :func:`check_local_inputs` says which flag gives the path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import LLMPruneError
from .save import REPORT_NAME


def report_path(path: str | Path) -> Path | None:
    """The ``llmprune.json`` that ``path`` names (a run folder or the file itself), else None."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / REPORT_NAME).is_file():
            return path / REPORT_NAME
        raise LLMPruneError(f"{path} is a folder without {REPORT_NAME}; --recipe takes a YAML recipe, a run folder "
                            f"(llmprune prune --output) or its {REPORT_NAME}")
    if path.is_file() and path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return None
        if isinstance(data, dict) and ("recipe" in data or "recovery" in data) and "versions" in data:
            return path
    return None


def read_run_report(path: str | Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    return data


def recipe_from_report(report: dict[str, Any], where: str | Path = REPORT_NAME) -> dict[str, Any]:
    """The recipe dict that re-runs the run ``report`` describes."""
    recipe = report.get("recipe")
    if not isinstance(recipe, dict):
        if "recovery" in report:
            raise LLMPruneError(f"{where} is the report of llmprune recover, not of a prune; re-run the prune from "
                                f"the pruned folder it names (pruning.recipe) and recover it again")
        raise LLMPruneError(f"{where} has no recipe; it was not written by llmprune prune")
    data = json.loads(json.dumps(recipe))
    for key in ("output", "overwrite", "data_dir"):
        data.pop(key, None)
    method = data.get("method") or {}
    if method.get("pattern") == "channels":  # how the report names a structured method's pattern
        method["pattern"] = None
    return data


def check_local_inputs(recipe: Any, report: dict[str, Any]) -> None:
    """Before any work: refuse a re-run whose local inputs, recorded by name only, are not given
    (the model folder or ``.gguf`` file, a calibration or evaluation file)."""
    from ..models.loading import resolve_source

    source = report.get("source") or {}
    recorded = (report.get("recipe") or {})
    hints = []
    if recipe.model.name == (recorded.get("model") or {}).get("name"):
        if source.get("kind") == "in-memory":
            hints.append(f"the run pruned a model in memory ({source.get('name')}); pass --model NAME_OR_PATH")
        elif source.get("kind") in ("folder", "gguf"):
            try:
                resolve_source(recipe.model.name)
            except LLMPruneError:
                hints.append(f"the run pruned the local model {recipe.model.name!r} (a {source['kind']}), recorded by "
                             f"name only; pass --model PATH")
    calib = report.get("calibration") or {}
    if (calib.get("dataset") == "file" and recipe.calib.dataset == (recorded.get("calib") or {}).get("dataset")
            and not Path(recipe.calib.dataset).expanduser().exists()):
        hints.append(f"it calibrated on the local file {recipe.calib.dataset!r}; pass --calib-dataset PATH "
                     f"(calibration.tokens_sha256 {calib.get('tokens_sha256')} tells whether it matches)")
    recorded_eval = (recorded.get("eval") or {}).get("datasets") or []
    for name in recipe.eval.datasets:
        if name in recorded_eval and name not in ("wikitext2", "c4") and ":" not in name \
                and not Path(name).expanduser().exists():
            hints.append(f"it evaluated on the local file {name!r}; pass --eval with its path")
    if hints:
        raise LLMPruneError("cannot re-run from the run folder as it is: " + "; ".join(hints))


def check_rerun(recipe_path: str | Path | None, recipe: Any) -> None:
    """:func:`check_local_inputs` when ``recipe_path`` (``--recipe``) is a run folder or report."""
    if recipe_path is None or not isinstance(recipe_path, (str, Path)):
        return
    found = report_path(recipe_path)
    if found is not None:
        check_local_inputs(recipe, read_run_report(found))
