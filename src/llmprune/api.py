"""The Python API: ``prune`` and ``evaluate``. The CLI is a shell around these two functions."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from .data.sources import TextSource, require_hub, resolve, resolve_data_dir
from .data.tokens import calibration_windows, evaluation_sets, token_hash
from .engine.engine import run_layerwise
from .engine.routed import check_moe_calib, moe_summary
from .engine.streaming import StreamingStore, partial_dir, settings_hash
from .errors import LLMPruneError, did_you_mean
from .eval.perplexity import perplexity
from .eval.zeroshot import PreparedTasks, prepare_tasks, run_zeroshot
from .io.card import loading_note
from .io.provenance import describe_loaded, describe_source, saved_dtype
from .io.public import namer_for, public_report
from .io.save import REPORT_NAME, check_output_dir, finish_folder, install_dir, read_report, save_run
from .methods import METHODS, Method
from .methods.experts import ExpertPruning, sync_config_counts
from .methods.structured import ChannelMethod, RemovalStep
from .models.loading import (
    _structure_record,
    gguf_to_folder,
    load_model,
    pick_device,
    pick_devices,
    pick_dtype,
    resolve_source,
)
from .models.moe import select_targets
from .models.shards import ShardReader, empty_model, tensor_bytes
from .models.view import ModelView, check_finite_weights, check_not_tied, model_view
from .recipe import Recipe, build_recipe, comma_list
from .report import param_count, peak_rss_mb, sparsity_report, versions
from .sparsity.patterns import Pattern, parse_pattern

log = logging.getLogger(__name__)

# API keyword -> recipe field (the CLI flags map to the same names).
FIELD_NAMES = {
    "model": "model.name",
    "dtype": "model.dtype",
    "device": "model.device",
    "stream": "model.stream",
    "method": "method.name",
    "sparsity": "method.sparsity",
    "pattern": "method.pattern",
    "calib_dataset": "calib.dataset",
    "nsamples": "calib.nsamples",
    "seqlen": "calib.seqlen",
    "seed": "calib.seed",
    "batch_size": "calib.batch_size",
    "eval": "eval.datasets",
    "eval_seqlen": "eval.seqlen",
    "eval_windows": "eval.windows",
    "eval_dense": "eval.dense",
    "tasks": "eval.tasks",
    "limit": "eval.limit",
    "num_fewshot": "eval.num_fewshot",
    "include_path": "eval.include_path",
    "uniform": "method.uniform",
    "round_to": "method.round_to",
    "data_dir": "data_dir",
    "output": "output",
    "overwrite": "overwrite",
}


@dataclass
class PruneResult:
    model: Any
    tokenizer: Any
    report: dict[str, Any]
    output: Path | None = None
    layer_reports: list[dict[str, Any]] = field(default_factory=list)
    method: Method | None = None


def fields_from_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = set(kwargs) - set(FIELD_NAMES) - {"method_options"}
    if unknown:
        raise LLMPruneError(f"unknown argument(s) {sorted(unknown)}; known: {sorted(FIELD_NAMES)} and method_options")
    fields = {FIELD_NAMES[k]: v for k, v in kwargs.items() if k in FIELD_NAMES}
    for key in ("eval.datasets", "eval.tasks"):
        if isinstance(fields.get(key), str):
            fields[key] = comma_list(fields[key])
    if isinstance(fields.get("model.stream"), bool):
        fields["model.stream"] = "on" if fields["model.stream"] else "off"
    for key, value in (kwargs.get("method_options") or {}).items():
        fields[f"method.{key}"] = value
    return fields


def resolve_method(recipe: Recipe) -> tuple[Method, Pattern]:
    """The method instance and pattern a recipe asks for, all options checked."""
    cls = METHODS.get(recipe.method.name)
    shaping = [k for k in ("uniform", "round_to") if k in recipe.method.options]
    if shaping and not cls.structured:
        flags = " / ".join(f"--{k.replace('_', '-')} (method.{k})" for k in shaping)
        structured = ", ".join(n for n in METHODS.names() if METHODS.get(n).structured)
        raise LLMPruneError(f"{flags} shape the widths of structured methods ({structured}); {cls.name} zeroes "
                            f"individual weights and never changes a shape, so there is nothing to make uniform "
                            f"or round")
    layerwise = [k for k in ("allocation", "owl_m", "owl_lambda", "reconstruct", "reconstruct_solver")
                 if k in recipe.method.options and k not in cls.Options.model_fields]
    if layerwise:
        having = {k: ", ".join(n for n in METHODS.names() if k in METHODS.get(n).Options.model_fields) for k in layerwise}
        what = "; ".join(f"method.{k} is an option of {having[k]}" for k in layerwise)
        why = (", which removes whole structures by its own allocation" if cls.structured
               else f" ({cls.name} reconstructs by itself; method.reconstruct_solver chooses how)"
               if "reconstruct_solver" in cls.Options.model_fields else "")
        raise LLMPruneError(f"{what}: not applicable to method {cls.name}{why}; drop "
                            f"{', '.join(f'method.{k}' for k in layerwise)}")
    if "order" in recipe.method.options and "order" not in cls.Options.model_fields:
        raise LLMPruneError(f"method.order chooses when an initializer prunes (method barber's init); method "
                            f"{cls.name} has no initializer, so drop method.order")
    try:
        options = cls.Options(**recipe.method.options)
    except ValidationError as exc:
        problems = "; ".join(f"method.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             + (did_you_mean(e["loc"][-1], cls.Options.model_fields) if e["type"] == "extra_forbidden"
                                else "") for e in exc.errors())
        fields = ", ".join(cls.Options.model_fields) or "none"
        raise LLMPruneError(f"invalid options for method {cls.name}: {problems} (its options: {fields})") from None
    pattern = parse_pattern(recipe.method.pattern, recipe.method.sparsity, scope=getattr(options, "scope", "row"))
    return cls(pattern, options), pattern


def resolved_recipe(recipe: Recipe, method: Method, pattern: Pattern) -> dict[str, Any]:
    data = recipe.to_dict()
    data["method"] = {
        "name": method.name,
        "sparsity": pattern.sparsity,
        "pattern": "channels" if method.structured else f"{pattern.n}:{pattern.m}" if pattern.is_nm else "unstructured",
        **method.options.model_dump(mode="json"),
    }
    return data


def _eval_sources(recipe: Recipe) -> list[TextSource]:
    return [resolve(d, "evaluation", recipe.data_dir) for d in recipe.eval.datasets]


def _evaluate_all(model: Any, tokens: dict[str, torch.Tensor], recipe: Recipe, device: torch.device, progress: bool, tag: str) -> dict[str, Any]:
    return {
        name: perplexity(
            model, ids, seqlen=recipe.eval.seqlen, windows=recipe.eval.windows, device=device,
            progress=progress, desc=f"{tag} {name} ppl",
        )
        for name, ids in tokens.items()
    }


def _zeroshot(model: Any, tok: Any, tasks: PreparedTasks, recipe: Recipe, device: torch.device) -> dict[str, Any]:
    ev = recipe.eval
    return run_zeroshot(model, tok, tasks, num_fewshot=ev.num_fewshot, limit=ev.limit, batch_size=ev.batch_size,
                        seed=recipe.calib.seed, device=device)


@dataclass
class _Plan:
    """A recipe with everything a user can get wrong checked: nothing loaded or computed yet."""

    recipe: Recipe
    method: Method
    pattern: Pattern
    calib_source: TextSource | None
    eval_sources: list[TextSource]
    tasks: PreparedTasks | None
    device: torch.device
    extra_devices: tuple[torch.device, ...] = ()  # more devices that share the calibration forwards


def _plan(rec: Recipe, tasks: PreparedTasks | None = None, check_output: bool = True) -> _Plan:
    method, pattern = resolve_method(rec)
    check_moe_calib(rec.calib.moe)  # the recipe's own values first, then the files and the network
    if rec.output is not None and check_output:
        check_output_dir(rec.output, rec.overwrite)
    resolve_data_dir(rec.data_dir)
    calib_source = resolve(rec.calib.dataset, "calibration", rec.data_dir) if method.calibration_needed else None
    eval_sources = _eval_sources(rec)
    for src in eval_sources:
        if calib_source is not None and src.key == calib_source.key:
            raise LLMPruneError(
                f"calibration and evaluation would both read {src.key}; never calibrate on the evaluated "
                f"split (choose another --calib-dataset)"
            )
    require_hub([s for s in (calib_source, *eval_sources) if s is not None])
    if tasks is None and rec.eval.tasks:
        tasks = prepare_tasks(rec.eval.tasks, data_dir=rec.data_dir, include_path=rec.eval.include_path)
    device, *extra = pick_devices(rec.model.device)
    pick_dtype(rec.model.dtype, device)  # an unknown dtype fails here, not after the data is read
    return _Plan(rec, method, pattern, calib_source, eval_sources, tasks, device, tuple(extra))


def _dense_evaluation(plan: _Plan, net: Any, tok: Any, eval_tokens: dict[str, torch.Tensor], progress: bool) -> dict[str, Any]:
    """``eval_dense`` / ``zeroshot_dense`` report sections and their timings (empty unless eval.dense)."""
    out: dict[str, Any] = {}
    if not plan.recipe.eval.dense:
        return out
    if eval_tokens:
        t0 = time.perf_counter()
        out["eval_dense"] = _evaluate_all(net, eval_tokens, plan.recipe, plan.device, progress, "dense")
        out["eval_dense_s"] = time.perf_counter() - t0
    if plan.tasks is not None:
        t0 = time.perf_counter()
        out["zeroshot_dense"] = _zeroshot(net, tok, plan.tasks, plan.recipe, plan.device)
        out["zeroshot_dense_s"] = time.perf_counter() - t0
    return out


def _report_fields(plan: _Plan, net: Any, calib_ids: torch.Tensor | None, sparsity: dict[str, Any],
                   structure: dict[str, Any], layer_reports: list[dict[str, Any]],
                   timings: dict[str, float]) -> dict[str, Any]:
    """The report sections every pruning run has (in memory or streamed)."""
    rec, method, pattern, calib_source = plan.recipe, plan.method, plan.pattern, plan.calib_source
    return {
        "method": method.name,
        "recipe": resolved_recipe(rec, method, pattern),
        "calibration": None if calib_source is None else {
            **calib_source.describe(), "nsamples": rec.calib.nsamples, "seqlen": rec.calib.seqlen,
            "seed": rec.calib.seed, "tokens": int(calib_ids.numel()) if calib_ids is not None else 0,
            "tokens_sha256": token_hash(calib_ids) if calib_ids is not None else None,
        },
        "evaluation_data": {s.name: s.describe() for s in plan.eval_sources},
        "sparsity": sparsity,
        "params": {"total": param_count(net), "pruned_linears": sparsity["weights"],
                   **({"dense": structure["params"]["dense"]} if method.structured else {})},
        **({"structure": structure} if method.structured else {}),
        "layers": layer_reports,
        **({"allocation": allocation} if (allocation := method.allocation_report()) is not None else {}),
        **({"moe": summary} if (summary := moe_summary(layer_reports)) is not None else {}),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "memory": {"peak_rss_mb": round(peak_rss_mb(), 1)},
        "device": str(plan.device),
        **({"devices": [str(d) for d in (plan.device, *plan.extra_devices)]} if plan.extra_devices else {}),
        "versions": versions(),
    }


def _execute(plan: _Plan, net: Any, tok: Any, view: ModelView, calib_ids: torch.Tensor | None,
             eval_tokens: dict[str, torch.Tensor], timings: dict[str, float], dense: dict[str, Any],
             progress: bool, t_start: float, model_name: str, share: PruneResult | None = None,
             extra: dict[str, Any] | None = None, save_to: Path | None = None) -> PruneResult:
    """Prune a loaded, checked model, evaluate, report and save. With ``share`` (a run of the same
    model on the same calibration data), its statistics are reused where the method allows it
    (structured methods: one calibration pass serves every ratio). ``save_to`` writes the run
    somewhere other than the recipe's output (a sweep being built beside the one it replaces)."""
    rec, method, pattern = plan.recipe, plan.method, plan.pattern
    report: dict[str, Any] = {"model": model_name}
    timings = dict(timings)
    for key in ("eval_dense", "zeroshot_dense"):
        if key in dense:
            report[key] = dense[key]
            timings[f"{key}_s"] = dense[f"{key}_s"]
    cache_device = torch.device("cpu") if rec.calib.offload else plan.device
    t0 = time.perf_counter()
    if share is not None and share.method is not None and method.share_statistics(share.method):
        layer_reports = [dict(r) for r in share.layer_reports]
        report["statistics_reused"] = True
    else:
        layer_reports = run_layerwise(view, method, calib_ids, device=plan.device, cache_device=cache_device,
                                      batch_size=rec.calib.batch_size, progress=progress,
                                      extra_devices=plan.extra_devices, moe_calib=rec.calib.moe)
    structure = method.finalize(view)
    timings["prune_s"] = time.perf_counter() - t0

    sparsity = sparsity_report(view, pattern)
    if eval_tokens:
        t0 = time.perf_counter()
        report["eval"] = _evaluate_all(net, eval_tokens, rec, plan.device, progress, "pruned")
        timings["eval_s"] = time.perf_counter() - t0
    if plan.tasks is not None:
        t0 = time.perf_counter()
        report["zeroshot"] = _zeroshot(net, tok, plan.tasks, rec, plan.device)
        timings["zeroshot_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    report.update(_report_fields(plan, net, calib_ids, sparsity, structure, layer_reports, timings))
    report.update(extra or {})
    report["loading"] = loading_note(report)
    source = describe_source(rec.model.name) if model_name == rec.model.name else describe_loaded(net)
    report["dtype"] = saved_dtype(rec.model.dtype, source, next(net.parameters()).dtype)
    report = public_report(report, source, rec.data_dir)
    out_path = None
    if rec.output is not None:
        out_path = save_run(net, tok, report, save_to or rec.output, overwrite=rec.overwrite,
                            dtype=pick_dtype(report["dtype"]["saved"], plan.device),
                            namer=namer_for(source, rec.data_dir))
        log.info("saved %s", out_path)
    return PruneResult(net, tok, report, out_path, layer_reports, method)


_STREAM_MEMORY_FRACTION = 0.5  # stream=auto streams a checkpoint larger than this share of available memory


def _streamable(cls: type[Method]) -> bool:
    """Whether a method is done with each layer once the engine leaves it (one streamed pass), or
    removes structure by a plan made from per-layer records (two streamed passes, ChannelMethod)."""
    if issubclass(cls, (ChannelMethod, ExpertPruning)):  # expert removal: one pass (per_layer=true: two passes)
        return True
    return not cls.structured and cls.propagate == "pruned" and cls.finalize is Method.finalize


def _stream_unsupported(plan: _Plan) -> list[str]:
    """Why this run cannot be streamed (empty: it can)."""
    rec, method = plan.recipe, plan.method
    reasons = []
    if not _streamable(type(method)):
        reasons.append(f"method {method.name} needs all layers before it removes anything (streaming supports "
                       f"{', '.join(streamable_methods())})")
    if method.initial_pass() is not None:
        reasons.append(f"method {method.name} with order=reference initializes every layer before rebuilding any")
    if method.allocation != "uniform":
        reasons.append(f"method.allocation={method.allocation} measures every layer of the dense model before pruning "
                       f"any, which a streamed run (one layer at a time) cannot do; prune in memory (model.stream=off)")
    if rec.eval.datasets or rec.eval.tasks:
        reasons.append("evaluation during a streamed prune is not supported; evaluate the output folder with "
                       "llmprune eval")
    if rec.output is None:
        reasons.append("a streamed prune writes its result to disk; pass --output")
    return reasons


def streamable_methods() -> list[str]:
    return [name for name in METHODS.names() if _streamable(METHODS.get(name))]


def _stream_source(plan: _Plan) -> Path | None:
    """The safetensors folder to stream from, or None to prune in memory (``model.stream``)."""
    rec = plan.recipe
    mode = rec.model.stream
    if mode == "off":
        return None
    source = resolve_source(rec.model.name)
    if mode == "auto":
        folder = Path(source.location)
        if source.kind != "folder" or _structure_record(folder) is not None or not any(folder.glob("*.safetensors")):
            return None
        import psutil

        dtype = pick_dtype(rec.model.dtype, plan.device)
        size = sum(tensor_bytes(t, dtype) for t in ShardReader.open(folder).tensors.values())
        available = psutil.virtual_memory().available
        if size <= _STREAM_MEMORY_FRACTION * available:
            return None
        reasons = _stream_unsupported(plan)
        if reasons:
            log.warning("the checkpoint (%.1f GB) may not fit in memory (%.1f GB available) but cannot be streamed: %s",
                        size / 1e9, available / 1e9, "; ".join(reasons))
            return None
        log.info("streaming: the checkpoint (%.1f GB) exceeds half the available memory (%.1f GB)",
                 size / 1e9, available / 1e9)
    reasons = _stream_unsupported(plan)
    if reasons:
        raise LLMPruneError("--stream: " + "; ".join(reasons))
    if source.kind == "hub":
        raise LLMPruneError(f"--stream reads local checkpoints; download {source.name} first "
                            f"(e.g. huggingface-cli download {source.name} --local-dir DIR) and pass the folder")
    if source.kind in ("builtin", "gguf"):
        return gguf_to_folder(source.location)
    if _structure_record(Path(source.location)) is not None:
        raise LLMPruneError(f"{source.location} is a structurally pruned checkpoint; --stream supports ordinary "
                            f"checkpoints only")
    return Path(source.location)


def _check_disk(reader: ShardReader, dtype: torch.dtype, work: Path, calib_ids: torch.Tensor | None,
                hidden_size: int) -> None:
    """Refuse before any work when the output (plus two layers' activations) cannot fit on the disk."""
    need = sum(tensor_bytes(t, dtype) for t in reader.tensors.values())
    if calib_ids is not None:
        need += 2 * calib_ids.numel() * hidden_size * torch.tensor([], dtype=dtype).element_size()
    if work.is_dir():
        need -= sum(p.stat().st_size for p in work.iterdir() if p.is_file())
    free = shutil.disk_usage(work.parent).free
    if need > free:
        raise LLMPruneError(f"not enough disk space in {work.parent} for the output: it needs about "
                            f"{need / 1e9:.2f} GB, {free / 1e9:.2f} GB are free")


def _prune_streamed(plan: _Plan, folder: Path, progress: bool, t_start: float) -> PruneResult:
    """Prune ``folder`` one decoder layer at a time into ``plan.recipe.output`` (resumably)."""
    from transformers import AutoTokenizer

    rec, method, pattern = plan.recipe, plan.method, plan.pattern
    assert rec.output is not None
    dest = Path(rec.output).expanduser()
    dtype = pick_dtype(rec.model.dtype, plan.device)
    t0 = time.perf_counter()
    reader = ShardReader.open(folder)
    net = empty_model(folder, dtype)
    view = model_view(net)
    _select_moe_targets(plan, view)
    method.validate(view)
    check_not_tied(view)
    tok = AutoTokenizer.from_pretrained(str(folder))
    source = describe_source(rec.model.name)
    dtype_record = saved_dtype(rec.model.dtype, source, dtype)
    save_dtype = pick_dtype(dtype_record["saved"], plan.device)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    calib_ids = None
    if plan.calib_source is not None:
        calib_ids = calibration_windows(tok, plan.calib_source, rec.calib.nsamples, rec.calib.seqlen, rec.calib.seed)
    data_s = time.perf_counter() - t0
    settings = {k: v for k, v in resolved_recipe(rec, method, pattern).items() if k not in ("output", "overwrite")}
    settings["model"] = {k: v for k, v in settings["model"].items() if k != "stream"}  # auto and on may resume each other
    settings_id = settings_hash({
        "recipe": settings, "tokens": token_hash(calib_ids) if calib_ids is not None else None,
        "checkpoint": reader.fingerprint(), "device": str(plan.device), "dtype": str(dtype),
        **({"save_dtype": str(save_dtype)} if save_dtype != dtype else {}),
    })
    work = partial_dir(dest)
    _check_disk(reader, dtype, work, calib_ids, int(getattr(net.config, "hidden_size", 0) or 0))
    store = StreamingStore(view, reader, work, settings_id, dtype, pattern, save_dtype=save_dtype)
    if store.start:
        log.info("resuming the streamed run in %s after layer %d", work, store.start - 1)
    resumed_from = store.start
    t0 = time.perf_counter()
    store.materialize_outside()
    if isinstance(method, ChannelMethod) or isinstance(method, ExpertPruning) and method.per_layer:
        layer_reports, structure = _remove_structure_streamed(plan, view, reader, work, settings_id, dtype, calib_ids,
                                                              store, progress)
    else:
        layer_reports = run_layerwise(view, method, calib_ids, device=plan.device, cache_device=torch.device("cpu"),
                                      batch_size=rec.calib.batch_size, progress=progress, store=store,
                                      extra_devices=plan.extra_devices, moe_calib=rec.calib.moe)
        structure = method.finalize(view)
        if isinstance(method, ExpertPruning):  # resumed after the last layer: no layer rewrote the config
            sync_config_counts(view, layer_reports)
    timings = {"load_s": load_s, "data_s": data_s, "prune_s": time.perf_counter() - t0}
    store.finish()
    net.config.dtype = save_dtype  # the config states the dtype of the shards, not of the computation
    net.config.save_pretrained(work)
    if net.can_generate() and getattr(net, "generation_config", None) is not None:
        net.generation_config.save_pretrained(work)
    tok.save_pretrained(work)
    timings["total_s"] = time.perf_counter() - t_start
    report = {"model": rec.model.name,
              **_report_fields(plan, net, calib_ids, store.sparsity(), structure, layer_reports, timings),
              "streaming": {"resumed_at_layer": resumed_from, "layers": len(view.layers)}}
    report["loading"] = loading_note(report)
    report["dtype"] = dtype_record
    report = public_report(report, source, rec.data_dir)
    finish_folder(work, report, namer_for(source, rec.data_dir))
    check_output_dir(dest, rec.overwrite)
    store.discard_progress()
    install_dir(work, dest)
    log.info("saved %s", dest)
    return PruneResult(None, tok, report, dest, layer_reports, method)


def _remove_structure_streamed(plan: _Plan, view: ModelView, reader: ShardReader, work: Path, settings_id: str,
                               dtype: torch.dtype, calib_ids: torch.Tensor | None, store: StreamingStore,
                               progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A structured method (or expert removal with per-layer counts), streamed: observe every layer
    (dense propagation), plan, then reload each layer, remove what the plan drops and write it
    (``store``). Returns the observing pass's layer reports (those of an in-memory run) and the
    structure report."""
    method: Any = plan.method
    assert isinstance(method, (ChannelMethod, ExpertPruning))
    observing = StreamingStore(view, reader, work, settings_id, dtype, plan.pattern, observer=method)
    if observing.complete:  # a resumed run whose observing pass had finished
        layer_reports = [dict(r) for r in observing.reports]
    else:
        layer_reports = run_layerwise(view, method, calib_ids, device=plan.device, cache_device=torch.device("cpu"),
                                      batch_size=plan.recipe.calib.batch_size, progress=progress, store=observing,
                                      extra_devices=plan.extra_devices)
    observing.close()
    method.plan_removal(view)
    for layer in view.layers[:store.start]:  # written before an interruption: only their shapes change here
        method.apply_removal_shape(layer)
    run_layerwise(view, RemovalStep(method), None, device=plan.device, progress=progress, store=store)
    if isinstance(method, ExpertPruning):
        method.fill_reports(layer_reports)
    return layer_reports, method.structure_report(view)


def _base_recipe(recipe: Recipe | str | Path | dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(recipe, Recipe):
        return recipe.to_dict()
    if isinstance(recipe, dict):
        return recipe
    if recipe is not None:
        from .recipe import load_recipe_dict

        return load_recipe_dict(recipe)
    return {}


def _select_moe_targets(plan: _Plan, view: ModelView) -> None:
    """``moe.targets``: restrict the view to the linears the weight-pruning methods may prune."""
    targets = plan.recipe.moe.targets
    if targets != "all" and isinstance(plan.method, ExpertPruning):
        raise LLMPruneError(f"moe.targets={targets} selects linears for weight pruning; {plan.method.name} removes "
                            f"whole routed experts (leave moe.targets=all)")
    select_targets(view, targets)


def _load_checked(plan: _Plan, model: Any, tokenizer: Any) -> tuple[Any, Any, ModelView, float]:
    """Load (or take) the model and run every check that needs it."""
    rec = plan.recipe
    t0 = time.perf_counter()
    if model is not None and not isinstance(model, (str, Path)):
        net, tok = model, tokenizer
    else:
        net, tok = load_model(rec.model.name, rec.model.dtype, rec.model.device)
    load_s = time.perf_counter() - t0
    view = model_view(net)
    _select_moe_targets(plan, view)
    plan.method.validate(view)
    check_not_tied(view)
    check_finite_weights(view)
    return net, tok, view, load_s


def prune(model: Any = None, *, tokenizer: Any = None, recipe: Recipe | str | Path | dict[str, Any] | None = None,
          progress: bool = False, announce: Callable[[Any], None] | None = None, preset: str | None = None,
          **kwargs: Any) -> PruneResult:
    """Prune a model in one shot and (optionally) evaluate and save it.

    ``model`` is a name (Hub id, folder, ``.gguf`` file, ``smollm2-135m``) or an in-memory
    ``PreTrainedModel`` (then pass ``tokenizer``). Keyword arguments mirror the CLI flags
    (``method``, ``sparsity``, ``pattern``, ``calib_dataset``, ``nsamples``, ``seqlen``, ``seed``,
    ``eval``, ``eval_seqlen``, ``eval_windows``, ``tasks``, ``limit``, ``data_dir``, ``output``,
    ``overwrite``) and ``method_options={...}`` sets method fields; ``preset`` ("best", "faithful";
    :mod:`llmprune.presets`) fills in the method's options under them. Everything is validated before
    any work is done. ``announce`` receives the plan (:class:`llmprune.planning.PlanSummary`) once
    everything is checked, before the model is loaded.
    """
    t_start = time.perf_counter()
    in_memory = model is not None and not isinstance(model, (str, Path))
    if model is not None and not in_memory:
        kwargs["model"] = str(model)
    rec = build_recipe(_base_recipe(recipe), fields_from_kwargs(kwargs), preset=preset)
    if isinstance(recipe, (str, Path)):
        from .io.rerun import check_rerun

        check_rerun(recipe, rec)  # a run folder's local inputs are recorded by name only
    if in_memory and tokenizer is None and (rec.eval.datasets or rec.eval.tasks or rec.output
                                            or resolve_method(rec)[0].calibration_needed):
        raise LLMPruneError("pass tokenizer= along with an in-memory model")

    plan = _plan(rec)  # everything a user can get wrong is checked here, before loading or computing anything
    stream_from = None if in_memory else _stream_source(plan)
    if stream_from is None and in_memory and rec.model.stream == "on":
        raise LLMPruneError("--stream reads a checkpoint from disk; pass a model name or folder, not a loaded model")
    if announce is not None:
        from .planning import config_facts, summarize

        facts = config_facts(model.config.to_dict()) if in_memory else None
        announce(summarize(plan, stream_from is not None, facts))
    if stream_from is not None:
        return _prune_streamed(plan, stream_from, progress, t_start)
    net, tok, view, load_s = _load_checked(plan, model if in_memory else None, tokenizer)
    t0 = time.perf_counter()
    calib_ids = None
    if plan.calib_source is not None:
        calib_ids = calibration_windows(tok, plan.calib_source, rec.calib.nsamples, rec.calib.seqlen, rec.calib.seed)
    eval_tokens = evaluation_sets(tok, plan.eval_sources)
    data_s = time.perf_counter() - t0
    dense = _dense_evaluation(plan, net, tok, eval_tokens, progress)
    return _execute(plan, net, tok, view, calib_ids, eval_tokens, {"load_s": load_s, "data_s": data_s}, dense,
                    progress, t_start, rec.model.name if not in_memory else type(net).__name__)


def evaluate(model: Any, *, tokenizer: Any = None, datasets: str | list[str] | None = None, seqlen: int = 2048,
             windows: int | None = None, tasks: str | list[str] | None = None, limit: int | None = None,
             num_fewshot: int = 0, batch_size: int = 8, include_path: str | None = None, seed: int = 0,
             data_dir: str | None = None, dtype: str = "auto", device: str = "auto",
             progress: bool = False) -> dict[str, Any]:
    """Perplexity on ``datasets`` and zero-shot accuracy on lm-eval ``tasks`` of a model (name,
    folder or in-memory model); returns a report dict. With neither, WikiText-2 perplexity."""
    fields: dict[str, Any] = {
        "eval.datasets": comma_list(datasets), "eval.tasks": comma_list(tasks),
        "eval.seqlen": seqlen, "eval.windows": windows, "eval.limit": limit, "eval.num_fewshot": num_fewshot,
        "eval.batch_size": batch_size, "eval.include_path": include_path, "calib.seed": seed, "data_dir": data_dir,
        "model.dtype": dtype, "model.device": device,
        **({"model.name": str(model)} if isinstance(model, (str, Path)) else {}),
    }
    if datasets is None and tasks is None:
        fields["eval.datasets"] = ["wikitext2"]
    rec = build_recipe(fields=fields)
    if not rec.eval.datasets and not rec.eval.tasks:
        raise LLMPruneError("name at least one evaluation dataset (wikitext2, c4 or a file) or zero-shot task")
    sources = _eval_sources(rec)
    require_hub(sources)
    prepared = prepare_tasks(rec.eval.tasks, data_dir=rec.data_dir, include_path=rec.eval.include_path) if rec.eval.tasks else None
    dev = pick_device(rec.model.device)
    if isinstance(model, (str, Path)):
        net, tok = load_model(str(model), rec.model.dtype, rec.model.device)
    else:
        if tokenizer is None:
            raise LLMPruneError("pass tokenizer= along with an in-memory model")
        net, tok = model, tokenizer
    net.to(dev)
    out: dict[str, Any] = {"model": str(model) if isinstance(model, (str, Path)) else type(net).__name__}
    timings: dict[str, float] = {}
    if sources:
        t0 = time.perf_counter()
        out["eval"] = _evaluate_all(net, evaluation_sets(tok, sources), rec, dev, progress, "eval")
        out["evaluation_data"] = {s.name: s.describe() for s in sources}
        timings["eval_s"] = time.perf_counter() - t0
    if prepared is not None:
        t0 = time.perf_counter()
        out["zeroshot"] = _zeroshot(net, tok, prepared, rec, dev)
        timings["zeroshot_s"] = time.perf_counter() - t0
    view: ModelView | None
    try:
        view = model_view(net)
    except LLMPruneError:
        view = None
    out.update({
        "sparsity": None if view is None else {"overall": sparsity_report(view)["overall"]},
        "params": {"total": param_count(net)},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "memory": {"peak_rss_mb": round(peak_rss_mb(), 1)},
        "device": str(dev),
        "versions": versions(),
    })
    if isinstance(model, (str, Path)) and (Path(model) / REPORT_NAME).is_file():
        out["run"] = run_record(read_report(model))
    if isinstance(model, (str, Path)):  # named as a run folder names it: no local paths (io.public)
        out = public_report(out, describe_source(str(model)), rec.data_dir)
    return out


def run_record(report: dict[str, Any]) -> dict[str, Any]:
    """What an evaluation of a run folder carries of that run (its ``llmprune.json``): the method and
    its settings, the calibration, the structure and the base model, so that ``llmprune report``
    compares the evaluation as that run (a structured run at its removed parameter fraction, beside
    its base model)."""
    keys = ("method", "recipe", "calibration", "structure", "sparsity")
    return {"base_model": report.get("model"), **{k: report[k] for k in keys if k in report}}


def load(path: str | Path, dtype: str = "auto", device: str = "auto") -> tuple[Any, Any]:
    """Load a model saved by llmprune (or any model): returns (model, tokenizer)."""
    return load_model(str(path), dtype, device)
