"""What ``llmprune methods`` and ``llmprune inspect`` show, as plain data (the CLI only prints it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# What each kind of statistic a method observes means, in words.
_STATS_WORDS = {
    "sq_norm": "calibration text: the norm of each input column of every linear (one forward per layer)",
    "hessian": "calibration text: each linear's input Hessian X^T X (memory: in_features^2 floats per linear)",
    "moments": "calibration text: per-channel activation moments (mean, variance) from one pass of the dense model",
}


def calibration_words(cls: Any) -> str:
    """What calibration a method class needs, in words (with what its options add)."""
    words = _base_calibration_words(cls)
    fields = cls.Options.model_fields
    extra = []
    if "reconstruct" in fields:
        extra.append("reconstruct=true: calibration text and each linear's input Hessian X^T X")
    if "allocation" in fields:
        extra.append("allocation=owl: calibration text and one more pass over the dense model (its Wanda outlier "
                     "ratios)")
    return words + (f" ({'; '.join(extra)})" if extra else "")


def _base_calibration_words(cls: Any) -> str:
    if not cls.needs_calibration:
        return "none: data-free, it reads the weights only"
    if cls.name == "barber":
        return ("calibration text: its initializer's statistics (wanda: input column norms; sparsegpt: the "
                "Hessian) plus the gradients of each block's reconstruction loss")
    if cls.name in ("reap", "expert-frequency"):
        return ("calibration text, routed by the model's own routers: each expert's routed tokens, router weights "
                "and (reap) output norms at every Mixture-of-Experts layer, layer i after layers 0..i-1 lost their "
                "experts (per_layer=true: every layer on the dense model)")
    return _STATS_WORDS.get(cls.stats or "", "calibration text")


def method_info(name: str) -> dict[str, Any]:
    """A method's summary, calibration and every option (type, default, description)."""
    from .methods import METHODS

    cls = METHODS.get(name)
    options = []
    for key, field in cls.Options.model_fields.items():
        annotation = getattr(field.annotation, "__args__", None)
        kind = " | ".join(repr(a) for a in annotation) if annotation and all(isinstance(a, str) for a in annotation) \
            else getattr(field.annotation, "__name__", str(field.annotation))
        options.append({"name": key, "type": kind, "default": field.default,
                        "description": (field.description or "").strip()})
    return {"name": cls.name, "summary": cls.summary, "calibration": calibration_words(cls),
            "structured": bool(cls.structured), "options": options}


def model_details(model: Any, folder: str | None) -> dict[str, Any]:
    """Parameter count, dtype, heads, per-layer widths of a loaded model; and, for a folder llmprune
    wrote, what was done to it (its ``llmprune.json``)."""
    from .models.view import model_view

    view = model_view(model)
    cfg = getattr(model, "config", None)
    text_cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    params = sum(p.numel() for p in model.parameters())
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    layers = []
    for layer in view.layers:
        widths = {name: list(lin.weight.shape) for name, lin in layer.linears.items()}
        mlp = max((shape[1] for name, shape in widths.items() if "down" in name or "fc2" in name or "w2" in name),
                  default=None)
        layers.append({"layer": layer.index, "attention": layer.attention_type, "mlp_width": mlp,
                       "params": sum(p.numel() for p in layer.module.parameters()), "linears": widths})
    out: dict[str, Any] = {
        **view.describe(),
        "params": params,
        "dtype": ", ".join(dtypes),
        "heads": getattr(text_cfg, "num_attention_heads", None),
        "kv_heads": getattr(text_cfg, "num_key_value_heads", None) or getattr(text_cfg, "num_attention_heads", None),
        "head_dim": getattr(text_cfg, "head_dim", None),
        "hidden_size": getattr(text_cfg, "hidden_size", None),
        "vocab_size": getattr(text_cfg, "vocab_size", None),
        "context": getattr(text_cfg, "max_position_embeddings", None),
        "per_layer": layers,
    }
    record = _run_record(folder)
    if record is not None:
        out["llmprune"] = record
    return out


def _run_record(folder: str | None) -> dict[str, Any] | None:
    """The parts of a run folder's ``llmprune.json`` that say what was done to the model."""
    if folder is None or not (Path(folder) / "llmprune.json").is_file():
        return None
    try:
        rep = json.loads((Path(folder) / "llmprune.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"error": "llmprune.json is unreadable"}
    recipe = rep.get("recipe") or {}
    out: dict[str, Any] = {"base_model": rep.get("model"), "method": rep.get("method"),
                           "settings": recipe.get("method"), "calibration": rep.get("calibration"),
                           "sparsity": (rep.get("sparsity") or {}).get("overall")}
    if "structure" in rep:
        out["structure"] = {k: rep["structure"][k] for k in ("mlp_channels", "params", "attention")
                            if k in rep["structure"]}
    if "recovery" in rep:
        rec = rep["recovery"]
        out["recovery"] = {k: rec.get(k) for k in ("capacity", "rank", "steps", "merge")}
    for key in ("eval", "eval_dense"):
        if rep.get(key):
            out[key] = {name: round(float(r["ppl"]), 4) for name, r in rep[key].items() if "ppl" in r}
    return out
