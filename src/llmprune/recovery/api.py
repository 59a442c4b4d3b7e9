"""``llmprune.recover``: LoRA recovery fine-tuning of a pruned model, importance-guided or uniform.

Order of work: every argument is checked (ranks, steps, merge mode against the model's kind,
training data against the evaluation data, output folder, an interrupted run's settings) before
the model is loaded; then the model is loaded, the training windows drawn, the per-block ranks
solved (:mod:`.capacity`), the model evaluated, trained (:mod:`.train`), merged (:mod:`.merge`),
evaluated again and saved atomically with its report.

Importance (``capacity="importance"``): ``importance="auto"`` uses the block importance a CFSP run
saved in its ``llmprune.json`` (``structure.block_importance``); for other llmprune runs (Wanda,
SparseGPT, other structured methods) it measures CFSP's angular importance on the pruned model,
on the first ``importance_windows`` training windows. A folder without ``llmprune.json`` is not a
pruned llmprune checkpoint: importance capacity then fails unless the user asks for the
measurement explicitly (``importance="computed"``) or chooses ``capacity="uniform"``.
``capacity="removed"`` multiplies each block's importance by the share of its dense weights that
pruning removed (from the report's structure record and the zero weights), so it needs a pruned model.

Resuming: the run works in ``DIR.partial/`` beside the output ``DIR``; it holds ``settings.json``
(everything that determines the trained weights), the evaluation before training and the latest
checkpoint. Re-running the same command continues from that checkpoint; different settings are
refused. When the run finishes, the model is saved to ``DIR`` and ``DIR.partial`` is removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.sources import resolve, resolve_data_dir
from ..data.tokens import calibration_windows, evaluation_sets, token_hash
from ..errors import LLMPruneError
from ..eval.perplexity import perplexity
from ..io.provenance import describe_source
from ..io.public import namer_for, public_report
from ..io.save import REPORT_NAME, check_output_dir, read_report, save_run, write_json_atomic
from ..models.loading import load_model, pick_device, resolve_source
from ..models.view import model_view
from ..recipe import comma_list
from ..report import param_count, peak_rss_mb, sparsity_report, versions
from .capacity import importance_ranks, trainable_params, uniform_ranks
from .merge import ADAPTER_DIR, MERGE_MODES, merge_adapter, weight_masks
from .targets import block_costs, measure_importance, rank_patterns, removed_shares, target_names
from .train import TrainConfig, read_checkpoint, train

log = logging.getLogger(__name__)

CAPACITIES = ("importance", "removed", "uniform")
IMPORTANCE_SOURCES = ("auto", "saved", "computed")
RULE = ("rank_l proportional to {weight} ** power, per-block per-rank costs, budget = uniform rank R on every "
        "block, clipped to [min_rank, max_rank] by water-filling, largest-remainder rounding never above the budget")
WEIGHTS = {"importance": "importance_l", "removed": "importance_l x removed_share_l"}


@dataclass
class RecoveryResult:
    model: Any
    tokenizer: Any
    report: dict[str, Any]
    output: Path | None
    main_process: bool = True  # False in the other processes of a multi-process launch (they write nothing)


def _saved_importance(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    for holder in (report, report.get("pruning") or {}):
        found = (holder.get("structure") or {}).get("block_importance")
        if isinstance(found, dict) and isinstance(found.get("values"), list):
            return found
    return None


def _model_kind(report: dict[str, Any] | None) -> str:
    """structured | sparse | unknown (no llmprune report: decided from the weights after loading)."""
    if report is None:
        return "unknown"
    if "structure" in report:
        return "structured"
    overall = (report.get("sparsity") or {}).get("overall") or 0.0
    return "sparse" if overall > 0 else "dense"


def _refuse_for_kind(model: str | Path, kind: str, detail: str, capacity: str, merge: str | None) -> None:
    """The options that need a pruned (``--capacity removed``) or sparse (``--merge mask``) model, checked
    once the model's kind is known: from its report before loading, else from its weights after."""
    if capacity == "removed" and kind == "dense":
        raise LLMPruneError(f"--capacity removed needs a pruned model, but {model} {detail}; "
                            f"use --capacity importance or uniform")
    if merge == "mask" and kind in ("structured", "dense"):
        raise LLMPruneError(f"--merge mask re-applies the zeros of a sparse model, but {model} {detail}; "
                            f"use --merge merge (structured and dense models keep their shape when merged)")


def _fingerprint(folder: Path) -> str:
    """Identity of a model folder (its config, report and weight file sizes), not of its path."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name in ("config.json", REPORT_NAME):
            digest.update(path.read_bytes())
        elif path.suffix == ".safetensors":
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def _summary(losses: list[float]) -> dict[str, Any]:
    k = max(1, len(losses) // 10)
    return {"first": losses[0], "last": losses[-1], "mean_first_10pct": sum(losses[:k]) / k,
            "mean_last_10pct": sum(losses[-k:]) / k, "min": min(losses), "curve": [round(v, 5) for v in losses]}


def recover(model: str | Path, *, output: str | Path, steps: int = 100, seqlen: int = 256, batch_size: int = 4,
            lr: float = 2e-4, rank: int = 8, alpha_per_rank: float = 2.0, capacity: str = "importance",
            importance: str = "auto", power: float = 1.0, max_rank: int | None = None,
            train_dataset: str = "c4", data_dir: str | None = None, eval: str | list[str] | None = "wikitext2",
            eval_seqlen: int = 2048, eval_windows: int | None = None, eval_every: int = 0,
            checkpoint_every: int = 25, importance_windows: int = 8, warmup: int | None = None,
            merge: str | None = None, seed: int = 0, dtype: str = "float32", device: str = "auto",
            overwrite: bool = False, progress: bool = False,
            on_step: Callable[[int], None] | None = None) -> RecoveryResult:
    """Fine-tune LoRA adapters on a pruned model and save the recovered model with its report.

    ``model``: a folder written by ``llmprune prune`` (or any model name ``llmprune.load`` takes,
    with ``capacity="uniform"`` or ``importance="computed"``). ``capacity="importance"`` gives each
    decoder block a LoRA rank following its block importance at the trainable-parameter count of
    ``rank`` on every block (``capacity="uniform"``), ``capacity="removed"`` one following its
    importance times the share of the block that pruning removed; ``merge`` is ``merge`` (default for structured
    and dense models), ``mask`` (default for sparse ones: merge and re-apply the zeros) or
    ``adapter`` (keep the adapter in ``output/adapter``). Training windows come from
    ``train_dataset`` (c4, wikitext2[:split] or a file; never the evaluated split). ``on_step(step)``
    is called after every finished step.
    """
    t_start = time.perf_counter()
    require_peft()
    # --- every argument a user can get wrong, before any work
    for name, value, low in (("rank", rank, 1), ("steps", steps, 1), ("batch_size", batch_size, 1),
                             ("seqlen", seqlen, 2), ("importance_windows", importance_windows, 1)):
        if not isinstance(value, int) or value < low:
            raise LLMPruneError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
    for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if value < 0:
            raise LLMPruneError(f"--{name.replace('_', '-')} must be >= 0 (0: never), got {value}")
    if not lr > 0 or not alpha_per_rank > 0:
        raise LLMPruneError(f"--lr and the alpha ratio must be positive, got {lr} and {alpha_per_rank}")
    if capacity not in CAPACITIES:
        raise LLMPruneError(f"--capacity must be one of {', '.join(CAPACITIES)}, got {capacity!r}")
    if importance not in IMPORTANCE_SOURCES:
        raise LLMPruneError(f"--importance must be one of {', '.join(IMPORTANCE_SOURCES)}, got {importance!r}")
    if merge is not None and merge not in MERGE_MODES:
        raise LLMPruneError(f"--merge must be one of {', '.join(MERGE_MODES)}, got {merge!r}")
    if max_rank is not None and max_rank < rank:
        raise LLMPruneError(f"--max-rank ({max_rank}) must be at least --rank ({rank})")
    warmup = max(1, steps // 10) if warmup is None else warmup
    if warmup < 1 or warmup > steps:
        raise LLMPruneError(f"--warmup must be in [1, steps={steps}], got {warmup}")
    source = resolve_source(str(model))
    folder = Path(source.location) if source.kind == "folder" else None
    pruned_report = read_report(folder) if folder is not None and (folder / REPORT_NAME).is_file() else None
    kind = _model_kind(pruned_report)
    saved = _saved_importance(pruned_report)
    importance_from = None
    if capacity != "uniform":
        if importance == "saved" and saved is None:
            raise LLMPruneError(f"{model} has no saved block importance (only CFSP runs record it in llmprune.json); "
                                f"use --importance computed to measure it, or --capacity uniform")
        if importance == "auto" and pruned_report is None:
            raise LLMPruneError(
                f"{model} is not a pruned llmprune checkpoint (no {REPORT_NAME}), so it has no block importance; "
                f"prune it with `llmprune prune` first, pass --importance computed to measure the importance on "
                f"the training data, or use --capacity uniform")
        importance_from = "saved" if importance != "computed" and saved is not None else "computed"
    _refuse_for_kind(model, kind, f"is {kind}", capacity, merge)
    dest = check_output_dir(output, overwrite)
    resolve_data_dir(data_dir)
    train_source = resolve(train_dataset, "calibration", data_dir)
    eval_sources = [resolve(d, "evaluation", data_dir) for d in comma_list(eval)]
    for src in eval_sources:
        if src.key == train_source.key:
            raise LLMPruneError(f"training and evaluation would both read {src.key}; never train on the evaluated "
                                f"split (choose another --train-dataset, e.g. c4 or wikitext2:train)")
    device_ = pick_device(device)
    # Under accelerate launch / torchrun this joins the launch's process group: one state per process,
    # the main one writes. ``cpu`` matters: without it accelerate sees no distributed run on a machine
    # without GPUs, and every process would train alone and write the same output.
    from accelerate import PartialState

    state = PartialState(cpu=device_.type == "cpu")
    world = state.num_processes
    if world > 1:
        device_ = state.device  # each process computes on the device its launcher gave it (cuda:LOCAL_RANK, cpu)
    settings = {
        "model": source.location, "model_fingerprint": _fingerprint(folder) if folder is not None else None,
        "steps": steps, "seqlen": seqlen, "batch_size": batch_size, "lr": lr, "warmup": warmup, "rank": rank,
        "alpha_per_rank": alpha_per_rank, "capacity": capacity, "importance": importance_from, "power": power,
        "max_rank": max_rank, "importance_windows": importance_windows, "train_data": train_source.key,
        "seed": seed, "dtype": dtype, "processes": world,  # the windows a step reads depend on the process count
    }
    work = dest.parent / f"{dest.name}.partial"
    resuming = False
    if work.exists():
        previous = json.loads((work / "settings.json").read_text()) if (work / "settings.json").is_file() else None
        if previous != settings:
            changed = sorted(k for k in settings if previous is None or previous.get(k) != settings[k])
            raise LLMPruneError(
                f"{work} holds an interrupted recovery run with different settings (differing: {', '.join(changed)}); "
                f"re-run with the same settings to resume it, or delete {work} to start over")
        resuming = read_checkpoint(work) is not None

    # --- load, data, capacity
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    net, tok = load_model(str(model), dtype, device)
    net.to(device_)
    load_s = time.perf_counter() - t0
    view = model_view(net)
    names = target_names(view)
    if kind == "unknown":
        kind = "sparse" if sparsity_report(view)["overall"] > 0.01 else "dense"
        _refuse_for_kind(model, kind, "has (almost) no zero weights and no llmprune report", capacity, merge)
    merge_mode = merge or ("mask" if kind == "sparse" else "merge")

    t0 = time.perf_counter()
    windows = calibration_windows(tok, train_source, steps * batch_size * world, seqlen, seed)
    eval_tokens = evaluation_sets(tok, eval_sources)
    data_s = time.perf_counter() - t0

    costs = block_costs(view)
    uniform = uniform_ranks(len(costs), rank)
    imp_record: dict[str, Any] | None = None
    if capacity == "uniform":
        ranks = uniform
    else:
        if importance_from == "saved":
            assert saved is not None
            values = [float(v) for v in saved["values"]]
            if len(values) != len(costs):
                raise LLMPruneError(f"{model}: the saved block importance has {len(values)} values for "
                                    f"{len(costs)} blocks; the report does not belong to this model")
            imp_record = {"source": "saved", "metric": saved.get("metric", "angular"), "values": values}
        else:
            with torch.no_grad():
                values = measure_importance(view, windows[:importance_windows], device_)
            imp_record = {"source": "computed", "metric": "angular", "per": "token",
                          "windows": min(importance_windows, windows.shape[0]), "values": values}
        if capacity == "removed":
            shares = removed_shares(view, (pruned_report or {}).get("structure"))
            imp_record["removed_share"] = shares
            values = [v * s for v, s in zip(values, shares, strict=True)]
            imp_record["weights"] = values
        ranks = importance_ranks(values, costs, rank, power=power, max_rank=max_rank)

    state.wait_for_everyone()  # every process has looked for an interrupted run before the main one starts one
    if not work.exists() and state.is_main_process:  # everything is checked: from here on, a run can be resumed
        work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(work / "settings.json", settings)
    state.wait_for_everyone()

    def evaluate_all(m: Any) -> dict[str, Any]:
        return {name: perplexity(m, ids, seqlen=eval_seqlen, windows=eval_windows, device=device_)
                for name, ids in eval_tokens.items()}

    timings: dict[str, float] = {"load_s": load_s, "data_s": data_s}
    eval_before = None
    if eval_tokens:
        before_path = work / "eval_before.json"
        if before_path.is_file():
            eval_before = json.loads(before_path.read_text())
        else:
            t0 = time.perf_counter()
            eval_before = evaluate_all(net)
            timings["eval_before_s"] = time.perf_counter() - t0
            if state.is_main_process:
                write_json_atomic(before_path, eval_before)

    masks = weight_masks(net, [n for block in names for n in block]) if merge_mode == "mask" else None
    flat = [n for block in names for n in block]
    rank_pattern, alpha_pattern = rank_patterns(names, ranks, alpha_per_rank)
    torch.manual_seed(seed)
    lora = LoraConfig(r=rank, lora_alpha=alpha_per_rank * rank, target_modules=flat, rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(net, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if trainable != trainable_params(ranks, costs):
        raise RuntimeError(f"PEFT trains {trainable} parameters, the capacity plan says {trainable_params(ranks, costs)}")

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, checkpoint_every=checkpoint_every,
                      eval_every=eval_every if eval_tokens else 0)
    history = train(peft_model, windows, cfg, work, cpu=device_.type == "cpu",
                    evaluate=evaluate_all if eval_tokens else None, progress=progress, on_step=on_step)
    timings["train_s"] = history["train_s"]

    # --- merge, evaluate, save
    check_ids = windows[: min(2, windows.shape[0]), : min(seqlen, 128)]
    t0 = time.perf_counter()
    eval_unmerged = None
    if merge_mode == "mask" and eval_tokens:
        eval_unmerged = evaluate_all(peft_model)
    if merge_mode == "adapter":
        final = peft_model
        merge_info: dict[str, Any] = {"mode": "adapter", "adapter_dir": ADAPTER_DIR}
    else:
        final, merge_info = merge_adapter(peft_model, merge_mode, masks, check_ids, device_)
        if eval_unmerged is not None:
            merge_info["eval_unmerged"] = eval_unmerged
    eval_after = evaluate_all(final) if eval_tokens else None
    if eval_after is not None and eval_unmerged is not None:
        merge_info["ppl_cost"] = {k: eval_after[k]["ppl"] - eval_unmerged[k]["ppl"] for k in eval_after}
    timings["merge_eval_s"] = time.perf_counter() - t0

    adapter_tmp = work / "adapter-final"
    if merge_mode == "adapter" and state.is_main_process:
        shutil.rmtree(adapter_tmp, ignore_errors=True)
        final.save_pretrained(adapter_tmp)
    base = final.unload() if merge_mode == "adapter" else final
    sparsity = sparsity_report(model_view(base))
    if masks is not None:
        merge_info["zeros_preserved"] = all(
            bool((base.get_submodule(n).weight[~m] == 0).all()) for n, m in masks.items())
    timings["total_s"] = time.perf_counter() - t_start
    recovery = {
        "capacity": capacity,
        "rule": RULE.format(weight=WEIGHTS[capacity]) if capacity != "uniform" else "the same rank on every block",
        "importance": imp_record, "power": power if capacity != "uniform" else None,
        "rank": rank, "max_rank": (max_rank or 2 * rank) if capacity != "uniform" else rank, "min_rank": 1,
        "ranks": ranks, "alpha_per_rank": alpha_per_rank, "alphas": [alpha_per_rank * r for r in ranks],
        "target_modules": list(view.layers[0].linears), "target_count": len(flat),
        "per_rank_costs": costs, "trainable_params": trainable,
        "uniform_budget": trainable_params(uniform, costs),
        "budget_gap": trainable_params(uniform, costs) - trainable,
        "steps": steps, "batch_size": batch_size, "processes": world, "seqlen": seqlen, "lr": lr,
        "schedule": {"warmup": warmup, "decay": "cosine", "min_lr_ratio": cfg.min_lr_ratio},
        "optimizer": {"name": "AdamW", "weight_decay": cfg.weight_decay, "grad_clip": cfg.grad_clip},
        "lora_dropout": 0.0, "seed": seed,
        "data": {**train_source.describe(), "windows": int(windows.shape[0]), "seqlen": seqlen,
                 "tokens": int(windows.numel()), "tokens_sha256": token_hash(windows)},
        "merge": merge_info, "model_kind": kind,
        "loss": _summary(history["losses"]), "eval_history": history["evals"],
        "resumed_from_step": history["resumed_from"],
    }
    report: dict[str, Any] = {
        "model": str(model),
        "method": (pruned_report or {}).get("method"),
        "eval_before": eval_before, "eval": eval_after,
        "evaluation_data": {s.name: s.describe() for s in eval_sources},
        "recovery": recovery,
        "sparsity": sparsity,
        "params": {"total": param_count(base), "trainable_lora": trainable},
        **({"structure": pruned_report["structure"]} if pruned_report and "structure" in pruned_report else {}),
        "pruning": pruned_report,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "memory": {"peak_rss_mb": round(peak_rss_mb(), 1)},
        "device": str(device_),
        "versions": versions(),
    }
    source = describe_source(str(model))  # published without local paths (llmprune.io.public)
    report = public_report(report, source, data_dir)
    out = dest
    if state.is_main_process:
        out = save_run(base, tok, report, dest, overwrite=overwrite, namer=namer_for(source, data_dir),
                       extra=(lambda tmp: shutil.copytree(adapter_tmp, tmp / ADAPTER_DIR)) if merge_mode == "adapter" else None)
        shutil.rmtree(work, ignore_errors=True)
    state.wait_for_everyone()
    if state.is_main_process:
        log.info("saved %s (resumed: %s; %d process%s)", out, resuming, world, "es" if world > 1 else "")
    if merge_mode == "adapter":
        from peft import PeftModel

        base = PeftModel.from_pretrained(base, str(out / ADAPTER_DIR)).eval()
    return RecoveryResult(base, tok, report, out, main_process=state.is_main_process)


def require_peft() -> None:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise LLMPruneError("recovery needs the PEFT library, which is not installed; install it with: "
                            "pip install 'llmprune[recover]' (or pip install 'peft>=0.21')")
