"""``llmprune sweep``: one model, one method, several values of one recipe field (sparsity by default).

Each point is an ordinary run folder (model, tokenizer, ``llmprune.json``) under the sweep folder,
named ``<field>-<value>`` (``sparsity-0.5``), and ``sweep.json`` indexes them::

    {"sweep": {model, method, parameter, values, recipe}, "complete": bool,
     "points": [{"value": 0.5, "folder": "sparsity-0.5", "status": "done"}, ...]}

What is done once for all points: every recipe is checked before any work; the model is loaded
once (later points reload it from disk, or copy the dense model kept in memory when it was given
as an object); calibration and evaluation tokens are built once; the dense model is evaluated
once. Structured methods (cfsp, flap, wanda-sp, magnitude-sp) calibrate on the dense model, so
their statistics do not depend on the ratio: one calibration pass serves every point (the report
says ``statistics_reused``). Unstructured methods calibrate each layer on the outputs of the
already pruned layers, which depend on the sparsity, so each point runs the engine again.

A sweep folder is never half-written: each point lands atomically, and ``sweep.json`` says which
are done. ``resume=True`` continues an interrupted sweep with the same settings; ``overwrite=True``
builds the new sweep beside the old one and replaces it only when complete.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .api import (
    PruneResult,
    _base_recipe,
    _dense_evaluation,
    _execute,
    _load_checked,
    _plan,
    fields_from_kwargs,
)
from .data.tokens import calibration_windows, evaluation_sets
from .engine.streaming import settings_hash
from .errors import LLMPruneError
from .io.provenance import describe_loaded, describe_source
from .io.public import namer_for, public_recipe
from .io.save import REPORT_NAME, SWEEP_NAME, check_parent, read_report, staged_dir, write_json_atomic
from .recipe import build_recipe


@dataclass
class SweepResult:
    output: Path
    points: list[dict[str, Any]]
    reports: list[dict[str, Any]]


def parse_values(text: str | list[Any] | tuple[Any, ...]) -> list[Any]:
    """``"0.3,0.5,0.7"`` -> [0.3, 0.5, 0.7] (each item read as YAML: numbers, booleans, words)."""
    items = [v.strip() for v in text.split(",")] if isinstance(text, str) else list(text)
    values = [yaml.safe_load(v) if isinstance(v, str) else v for v in items if v != ""]
    if not values:
        raise LLMPruneError("a sweep needs at least one value (e.g. --sparsities 0.3,0.5,0.7)")
    if len({repr(v) for v in values}) != len(values):
        raise LLMPruneError(f"sweep values repeat: {values}; give each value once")
    return values


def _folder(parameter: str, value: Any) -> str:
    text = str(value).replace("/", "_").replace(" ", "")
    return f"{parameter.rsplit('.', 1)[-1]}-{text}"


def _settings(base: dict[str, Any], parameter: str, values: list[Any]) -> dict[str, Any]:
    recipe = {k: v for k, v in base.items() if k not in ("output", "overwrite")}
    return {"model": base["model"]["name"], "method": base["method"]["name"], "parameter": parameter,
            "values": values, "recipe": recipe}


def sweep(model: Any = None, *, values: str | list[Any], parameter: str = "method.sparsity", tokenizer: Any = None,
          recipe: Any = None, resume: bool = False, save_models: bool = True, progress: bool = False,
          **kwargs: Any) -> SweepResult:
    """Prune ``model`` once per value of ``parameter`` (a recipe field such as ``method.sparsity``,
    ``method.ratio``); keyword arguments are those of :func:`llmprune.prune` (``output`` is the
    sweep folder)."""
    vals = parse_values(values)
    if parameter.split(".", 1)[0] in ("model", "data_dir", "output", "overwrite"):
        raise LLMPruneError(f"cannot sweep {parameter}: a sweep is one model into one folder; sweep a method, "
                            f"calib or eval field (e.g. method.sparsity, method.ratio)")
    output = kwargs.pop("output", None)
    overwrite = bool(kwargs.pop("overwrite", False))
    if output is None:
        raise LLMPruneError("a sweep needs an output folder (--output DIR); each point is written under it")
    in_memory = model is not None and not isinstance(model, (str, Path))
    if model is not None and not in_memory:
        kwargs["model"] = str(model)
    base = build_recipe(_base_recipe(recipe), fields_from_kwargs(kwargs))
    if base.model.stream == "on":
        raise LLMPruneError("sweeps prune in memory (their points share one loaded model); model.stream=on is for "
                            "llmprune prune")
    if in_memory and tokenizer is None:
        raise LLMPruneError("pass tokenizer= along with an in-memory model")
    dest = Path(output).expanduser()
    settings = _settings(base.to_dict(), parameter, vals)
    # The index publishes its settings without local paths (io.public); resuming compares the full
    # settings, paths included, by their hash.
    settings_id = settings_hash(settings)

    # --- check everything first: the folder, then every point's recipe --------------------------
    done: set[str] = set()
    if dest.exists():
        if resume:
            index = dest / SWEEP_NAME
            if not index.is_file():
                raise LLMPruneError(f"{dest} has no {SWEEP_NAME}; it is not a sweep folder to resume")
            previous = json.loads(index.read_text(encoding="utf-8"))
            same = (previous.get("settings_sha256") == settings_id if "settings_sha256" in previous
                    else previous.get("sweep") == json.loads(json.dumps(settings)))  # an index written before
            if not same:
                raise LLMPruneError(f"{dest} holds a sweep with other settings; resume needs the same command "
                                    f"(or pass --overwrite to replace it)")
            done = {p["folder"] for p in previous.get("points", []) if p.get("status") == "done"
                    and (dest / p["folder"] / REPORT_NAME).is_file()}
        elif not overwrite:
            raise LLMPruneError(f"output folder {dest} already exists; choose another --output, pass --resume to "
                                f"continue an interrupted sweep, or --overwrite to replace it")
    elif resume:
        raise LLMPruneError(f"nothing to resume: {dest} does not exist")
    check_parent(dest)
    dest.resolve().parent.mkdir(parents=True, exist_ok=True)
    replacing = dest.exists() and not resume
    # Replacing an old sweep: build beside it, swap in when complete (io.save.staged_dir).
    stage = staged_dir(dest, overwrite=True) if replacing else contextlib.nullcontext(dest)
    with stage as work:
        plans = []
        tasks = None
        for value in vals:
            folder = _folder(parameter, value)
            rec = build_recipe(base.to_dict(), {parameter: value, "output": str(dest / folder) if save_models else None,
                                                "overwrite": False})
            plan = _plan(rec, tasks=tasks, check_output=False)
            tasks = plan.tasks
            plans.append((value, folder, plan))
        source = describe_source(base.model.name) if not in_memory else describe_loaded(model)
        public = {**settings, "model": source["name"], "settings_sha256": settings_id,
                  "recipe": public_recipe(settings["recipe"], source, namer_for(source, base.data_dir))}
        points, reports = _run_points(plans, work, done, public, parameter, model if in_memory else None,
                                      tokenizer, save_models, progress)
    return SweepResult(dest, points, reports)


def _run_points(plans: list[tuple[Any, str, Any]], work: Path, done: set[str], settings: dict[str, Any],
                parameter: str, model: Any, tokenizer: Any, save_models: bool,
                progress: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run the pending points into ``work``; ``model`` is the in-memory dense model (None: load by name).
    Returns the index's points and the reports of every point."""
    work.mkdir(parents=True, exist_ok=True)
    points = [{"value": v, "folder": f, "status": "done" if f in done else "pending"} for v, f, _ in plans]
    reports: list[dict[str, Any]] = [read_report(work / f) for _, f, _ in plans if f in done]

    def write_index(complete: bool) -> None:
        write_json_atomic(work / SWEEP_NAME, {"sweep": {k: v for k, v in settings.items() if k != "settings_sha256"},
                                              "settings_sha256": settings["settings_sha256"], "complete": complete,
                                              "points": points})

    write_index(False)
    calib_cache: dict[tuple[Any, ...], Any] = {}
    eval_tokens: dict[str, Any] | None = None  # the tokenizer is the same at every point
    dense: dict[str, Any] | None = None
    shared: tuple[tuple[Any, ...], PruneResult] | None = None  # (calibration key, last run without its model)
    for i, (value, folder, plan) in enumerate(plans):
        if folder in done:
            continue
        rec = plan.recipe
        t_point = time.perf_counter()
        source = copy.deepcopy(model) if model is not None else None  # the caller's model stays dense
        net, tok, view, load_s = _load_checked(plan, source, tokenizer)
        t0 = time.perf_counter()
        calib_key = (plan.calib_source.key if plan.calib_source else None, rec.calib.nsamples,
                     rec.calib.seqlen, rec.calib.seed)
        if plan.calib_source is not None and calib_key not in calib_cache:
            calib_cache[calib_key] = calibration_windows(tok, plan.calib_source, rec.calib.nsamples,
                                                         rec.calib.seqlen, rec.calib.seed)
        if eval_tokens is None or parameter == "eval.datasets":
            eval_tokens = evaluation_sets(tok, plan.eval_sources)
        data_s = time.perf_counter() - t0
        if dense is None:
            dense = _dense_evaluation(plan, net, tok, eval_tokens, progress)
        share = shared[1] if shared is not None and shared[0] == calib_key else None
        result = _execute(plan, net, tok, view, calib_cache.get(calib_key), eval_tokens,
                          {"load_s": load_s, "data_s": data_s}, dense, progress, t_point,
                          rec.model.name if model is None else type(net).__name__, share=share,
                          extra={"sweep": {"parameter": parameter, "value": value, "index": i, "folder": folder}},
                          save_to=work / folder)
        if not save_models:
            (work / folder).mkdir(parents=True, exist_ok=True)
            write_json_atomic(work / folder / REPORT_NAME, result.report)
        shared = (calib_key, PruneResult(None, None, {}, None, result.layer_reports, result.method))
        reports.append(result.report)
        points[i]["status"] = "done"
        write_index(False)
        del net, result
    write_index(True)
    order = {f: k for k, (_, f, _) in enumerate(plans)}
    reports.sort(key=lambda r: order.get(r.get("sweep", {}).get("folder"), 0))
    return points, reports
