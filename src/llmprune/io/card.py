"""The model card (``README.md``) of a run folder, generated from its report.

Hub metadata through ``huggingface_hub.ModelCardData`` (``base_model`` when the source names one,
``library_name``, tags for pruning, the method and the sparsity pattern, ``license`` when the
source states it, the Hub datasets calibrated or trained on), then a body: what was done with
every setting, the calibration data, the results (perplexity dense and pruned, zero-shot accuracy,
sparsity and parameters), how to load the folder, and how to re-run it. Everything comes from the
(already path-free, :mod:`llmprune.io.public`) report, so the card says what the run did and
nothing else.
"""

from __future__ import annotations

from typing import Any

_HUB_DATASETS = {"c4": "allenai/c4", "wikitext2": "Salesforce/wikitext"}
_LOAD_NAME = "RUN_DIR"  # stands for the folder (or the Hub repo it is uploaded to) in the snippets


def stock_loadable(report: dict[str, Any]) -> bool:
    """Whether plain ``AutoModelForCausalLM.from_pretrained`` builds this folder's model."""
    structure = report.get("structure") or {}
    checkpoint = structure.get("checkpoint") or {}
    return bool(checkpoint.get("stock_checkpoint", True)) and not _experts_differ(report)


def _experts_differ(report: dict[str, Any]) -> bool:
    """Whether expert removal left different expert counts in the MoE layers (method.per_layer=true)."""
    return len((report.get("moe") or {}).get("experts_per_layer") or []) > 1


def loading_note(report: dict[str, Any]) -> dict[str, Any]:
    """Whether stock ``from_pretrained`` loads the run's folder; when not, why and the ways out
    (the report's ``loading`` section, also shown at the end of ``llmprune prune``)."""
    checkpoint = (report.get("structure") or {}).get("checkpoint") or {}
    if stock_loadable(report):
        return {"stock_from_pretrained": True}
    why, ways = [], []
    if _experts_differ(report):
        why.append("the routed expert counts differ across MoE layers (method.per_layer=true); stock "
                   "from_pretrained refuses the size mismatch")
        ways.append("remove experts with method.per_layer=false (the same count in every layer)")
    if len(set(checkpoint.get("mlp_widths") or [])) > 1:
        why.append("the MLP widths differ across layers")
        if not checkpoint.get("mlp_out_bias"):
            ways.append("prune with --uniform (every layer the same width)")
    if len(set(checkpoint.get("attn_kv_heads") or [])) > 1:
        why.append("the KV-head counts differ across layers")
    if checkpoint.get("mlp_out_bias"):
        why.append("an MLP output bias was added (FLAP's compensation), which stock configs have no place for")
    why = why or ["its config records per-layer shapes (llmprune_structure)"]
    if checkpoint and not checkpoint.get("stock_checkpoint", True):
        ways.append("export it: llmprune export RUN_DIR --format gguf --output FILE.gguf (llama.cpp reads per-layer "
                    "widths)")
    return {"stock_from_pretrained": False, "why": why, "ways_out": ways,
            "load_with": "llmprune.load(RUN_DIR) (rebuilds each layer to its recorded "
                         f"{'width' if checkpoint else 'expert count'})"}


def _pattern(report: dict[str, Any]) -> str:
    if "structure" in report:
        return "structured"
    recipe = report.get("recipe") or (report.get("pruning") or {}).get("recipe") or {}  # recover: the prune's
    pattern = str((recipe.get("method") or {}).get("pattern") or "unstructured")
    return pattern if pattern != "channels" else "structured"


def _tags(report: dict[str, Any]) -> list[str]:
    method = report.get("method")
    pattern = _pattern(report)
    tags = ["llmprune", "pruning"]
    if method:
        tags.append(str(method))
    if pattern == "structured":
        tags.append("structured-pruning")
    elif pattern == "unstructured":
        tags += ["sparse", "unstructured-sparsity"]
    else:
        tags += ["sparse", f"{pattern}-sparsity", "semi-structured-sparsity"]
    if "recovery" in report:
        tags += ["lora", "recovery"]
    return tags


def _datasets(report: dict[str, Any]) -> list[str]:
    names = []
    for section in (report.get("calibration"), ((report.get("pruning") or {}).get("calibration")),
                    ((report.get("recovery") or {}).get("data"))):
        if isinstance(section, dict) and section.get("dataset") in _HUB_DATASETS:
            names.append(_HUB_DATASETS[section["dataset"]])
    return list(dict.fromkeys(names))


def card_data(report: dict[str, Any]) -> Any:
    from huggingface_hub import ModelCardData

    source = report.get("source") or {}
    return ModelCardData(
        base_model=source.get("base_model"),
        license=source.get("license"),
        library_name="transformers" if stock_loadable(report) else "llmprune",
        pipeline_tag="text-generation",
        tags=_tags(report),
        datasets=_datasets(report) or None,
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) if value else "—"
    return "—" if value is None else f"`{value}`" if isinstance(value, str) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return (value if isinstance(value, str) else _fmt(value)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]


def _settings(report: dict[str, Any]) -> list[str]:
    recipe = report.get("recipe") or {}
    rows = []
    for section in ("method", "calib", "model", "eval"):
        for key, value in (recipe.get(section) or {}).items():
            rows.append([f"`{section}.{key}`", _fmt(value)])
    return _table(["setting", "value"], rows) if rows else []


def _calibration(section: dict[str, Any] | None, what: str) -> list[str]:
    if not section:
        return [f"No {what} data (the method is data-free)."]
    keys = ("dataset", "split", "file", "origin", "documents", "nsamples", "windows", "seqlen", "seed", "tokens",
            "tokens_sha256")
    return _table(["", "value"], [[k, _fmt(section[k])] for k in keys if k in section])


def _results(report: dict[str, Any]) -> list[str]:
    out: list[str] = []
    evals = report.get("eval") or {}
    dense = report.get("eval_dense") or report.get("eval_before") or {}
    dense_label = "before recovery" if "eval_before" in report else "dense"
    if evals:
        rows = []
        for name, res in evals.items():
            row = [name, str(res.get("seqlen")), f"{res.get('windows')} of {res.get('windows_available')}"]
            row.append(f"{dense[name]['ppl']:.3f}" if name in dense else "—")
            row.append(f"{res['ppl']:.3f}")
            rows.append(row)
        out += ["Perplexity (non-overlapping windows of `seqlen` tokens; lower is better):", ""]
        out += _table(["dataset", "seqlen", "windows", f"{dense_label} ppl", "ppl"], rows) + [""]
    zs = report.get("zeroshot") or {}
    if zs.get("tasks"):
        zdense = (report.get("zeroshot_dense") or {}).get("tasks", {})
        rows = [[name, str(res.get("samples")), _fmt((zdense.get(name) or {}).get("acc")), _fmt(res.get("acc")),
                 _fmt(res.get("acc_norm"))] for name, res in zs["tasks"].items()]
        out += ["Zero-shot accuracy (lm-evaluation-harness):", ""]
        out += _table(["task", "documents", "dense acc", "acc", "acc_norm"], rows) + [""]
    rows = []
    sparsity = report.get("sparsity") or {}
    if sparsity.get("overall") is not None:
        rows.append(["sparsity of the decoder linears", f"{sparsity['overall']:.4f}"])
    if "nm_valid" in sparsity:
        rows.append([f"{sparsity.get('pattern')} pattern valid", str(sparsity["nm_valid"])])
    structure = report.get("structure") or {}
    if structure:
        mlp, params = structure.get("mlp_channels") or {}, structure.get("params") or {}
        rows.append(["MLP channels removed", f"{mlp.get('removed_fraction', 0):.4f} ({mlp.get('kept'):,} of "
                     f"{mlp.get('dense'):,} kept)"])
        widths = mlp.get("widths") or []
        if widths:
            rows.append(["MLP width per layer", ", ".join(str(w) for w in widths)])
        if "attention" in structure:
            rows.append(["KV groups removed", f"{structure['attention'].get('removed_fraction', 0):.4f}"])
        rows.append(["parameters", f"{params.get('dense'):,} -> {params.get('pruned'):,} "
                     f"({params.get('removed_fraction', 0):.4f} removed)"])
    elif (report.get("params") or {}).get("total"):
        rows.append(["parameters", f"{report['params']['total']:,}"])
    if rows:
        out += _table(["", "value"], rows)
    return out


def _loading(report: dict[str, Any]) -> list[str]:
    out: list[str] = []
    adapter = ((report.get("recovery") or {}).get("merge") or {}).get("mode") == "adapter"
    if adapter:
        out += ["The weights are the pruned model; the recovered LoRA adapter is in `adapter/` (PEFT):", "",
                "```python", "import llmprune", "", f'model, tokenizer = llmprune.load("{_LOAD_NAME}")  '
                "# base weights + adapter", "```", ""]
    elif stock_loadable(report):
        out += ["A stock checkpoint: plain transformers loads it.", "", "```python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{_LOAD_NAME}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{_LOAD_NAME}")', "```", ""]
    else:
        note = loading_note(report)
        out += ["Stock `AutoModelForCausalLM.from_pretrained` cannot build this model (it fails with a size "
                f"mismatch): {'; '.join(note['why'])}. The shapes are recorded under `llmprune_structure` in "
                "`config.json`; llmprune rebuilds each layer to them:", "", "```python",
                "import llmprune", "", f'model, tokenizer = llmprune.load("{_LOAD_NAME}")', "```", ""]
        if any("--uniform" in way for way in note["ways_out"]):
            out += ["For a checkpoint stock transformers loads, prune again with `--uniform` (every layer the same "
                    "width).", ""]
    out += ["For llama.cpp, Ollama or LM Studio, export a GGUF file (per-layer widths included):", "", "```bash",
            f"llmprune export {_LOAD_NAME} --format gguf --output model.gguf", "```", "",
            f"`{_LOAD_NAME}` is this folder (or, once uploaded, its Hub repository)."]
    return out


def _reproduce(report: dict[str, Any]) -> list[str]:
    if "recipe" not in report:
        return []
    recipe = report["recipe"]
    source = report.get("source") or {}
    lines = ["`llmprune.json` holds the full recipe; this re-runs it with the same settings:", "", "```bash",
             f"llmprune prune --recipe {_LOAD_NAME} --output NEW_DIR", "```", ""]
    local = []
    if source.get("kind") in ("folder", "gguf") and "/" not in str(source.get("name", "")):
        local.append(f"`--model PATH` (the local model `{source.get('name')}`)")
    calib = str((recipe.get("calib") or {}).get("dataset", ""))
    if report.get("calibration") and (report["calibration"].get("dataset") == "file"):
        local.append(f"`--calib-dataset PATH` (the local file `{calib}`)")
    if local:
        lines += ["The run read local inputs, recorded by name only; add " + " and ".join(local) + ". "
                  "`calibration.tokens_sha256` in `llmprune.json` tells whether the calibration tokens match.", ""]
    lines += ["Datasets named `wikitext2` / `c4` come from the Hub, or from a local mirror given with "
              "`--data-dir` (or `LLMPRUNE_DATA_DIR`)."]
    return lines


def _provenance(report: dict[str, Any]) -> list[str]:
    rows = []
    dtype = report.get("dtype") or {}
    if dtype:
        rows.append(["saved dtype", f"`{dtype.get('saved')}` ({dtype.get('rule')}); computed in "
                     f"`{dtype.get('compute')}`"])
    source = report.get("source") or {}
    if source:
        rows.append(["source", ", ".join(f"{k} `{v}`" for k, v in source.items())])
    versions = report.get("versions") or {}
    if versions:
        rows.append(["versions", ", ".join(f"{k} {v}" for k, v in versions.items() if k not in ("cpu", "malloc"))])
        if versions.get("cpu"):
            rows.append(["processor", str(versions["cpu"])])
    if report.get("device"):
        rows.append(["device", f"`{report['device']}`"])
    timings = report.get("timings") or {}
    if timings:
        rows.append(["timings (s)", ", ".join(f"{k.removesuffix('_s')} {v}" for k, v in timings.items())])
    return _table(["", "value"], rows) if rows else []


def card_text(report: dict[str, Any]) -> str:
    """The whole ``README.md``: YAML metadata, then the body (module docstring)."""
    from huggingface_hub import ModelCard

    source = report.get("source") or {}
    base = source.get("base_model") or source.get("name") or report.get("model")
    method = report.get("method") or "a method"
    recovered = "recovery" in report
    pattern = _pattern(report)
    what = {"structured": "whole MLP channels removed (structured pruning)",
            "unstructured": "individual weights set to zero (unstructured sparsity)"}.get(
        pattern, f"weights set to zero in a {pattern} pattern (semi-structured sparsity)")
    title = f"# {base} pruned with {method}" + (" and recovered with LoRA" if recovered else "")
    body = [title, "", f"`{base}` with {what} by **{method}**, in one shot with llmprune "
            f"{(report.get('versions') or {}).get('llmprune', '')}.".replace(" .", "."), ""]
    if source.get("gguf_file_type") and not source.get("dtype"):
        body += [f"The weights pruned are those of the quantized GGUF file `{source.get('file')}` "
                 f"({source['gguf_file_type']}), dequantized: they carry its rounding, and the dense numbers below "
                 f"are of the dequantized file, not of `{base}` itself.", ""]
    elif source.get("gguf_file_type"):
        body += [f"The weights pruned are those of the GGUF file `{source.get('file')}` ({source['gguf_file_type']}).",
                 ""]
    if recovered:
        rec = report["recovery"]
        body += [f"Then fine-tuned with LoRA ({rec.get('capacity')} ranks, {rec.get('steps')} steps of "
                 f"{rec.get('batch_size')} x {rec.get('seqlen')} tokens) and merged (`{(rec.get('merge') or {}).get('mode')}`).",
                 ""]
    body += ["## Results", "", *_results(report), "", "## How to load", "", *_loading(report), ""]
    body += ["## Method and settings", "", *(_settings(report) or _settings(report.get("pruning") or {})), ""]
    body += ["## Calibration data", "", *_calibration(report.get("calibration")
                                                      or (report.get("pruning") or {}).get("calibration"),
                                                      "calibration"), ""]
    if recovered:
        body += ["## Recovery training data", "", *_calibration((report["recovery"] or {}).get("data"), "training"),
                 ""]
    reproduce = _reproduce(report)
    if reproduce:
        body += ["## Reproduce", "", *reproduce, ""]
    body += ["## Provenance", "", *_provenance(report), "",
             "Generated by llmprune from `llmprune.json`, which holds every number above and more."]
    card = ModelCard(f"---\n{card_data(report).to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
    return str(card)
