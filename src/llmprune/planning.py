"""The plan line: what a prune is about to do, said before any work (``llmprune prune`` prints it).

Everything comes from the checked recipe and the model's metadata, read without loading weights:
``config.json`` of a folder, the header of a ``.gguf`` file (which is checked here, so a damaged
file fails before the plan is shown). A Hub model's shape is unknown until it is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ModelFacts:
    """What a model's metadata says, without loading it (None: unknown)."""

    layers: int | None = None
    context: int | None = None


@dataclass
class PlanSummary:
    text: str  # the plan line
    warnings: list[str] = field(default_factory=list)
    facts: ModelFacts = field(default_factory=ModelFacts)


def config_facts(config: dict[str, Any]) -> ModelFacts:
    inner = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    def pick(*keys: str) -> int | None:
        for source in (config, inner):
            for key in keys:
                value = source.get(key)
                if isinstance(value, int) and value > 0:
                    return value
        return None

    return ModelFacts(pick("num_hidden_layers", "n_layer", "num_layers"),
                      pick("max_position_embeddings", "n_positions", "max_sequence_length"))


def model_facts(name: str) -> ModelFacts:
    """Layers and context length of a model name (folder, .gguf, built-in) from its metadata only."""
    from .models.loading import resolve_source

    source = resolve_source(name)
    if source.kind in ("builtin", "gguf"):
        from .models.gguf_check import check_gguf

        info = check_gguf(source.location)
        return ModelFacts(info.layers, info.context_length)
    if source.kind == "folder":
        try:
            return config_facts(json.loads((Path(source.location) / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return ModelFacts()
    return ModelFacts()


def summarize(plan: Any, streamed: bool, facts: ModelFacts | None = None) -> PlanSummary:
    """The plan line of a checked ``api._Plan`` (and the warnings it raises: a calibration window
    longer than the model's context)."""
    from .models.loading import pick_dtype

    rec, method, pattern = plan.recipe, plan.method, plan.pattern
    facts = facts if facts is not None else model_facts(rec.model.name)
    if method.structured:
        shape = f"{pattern.sparsity:g} of the MLP channels" if getattr(method.options, "target", "mlp") == "mlp" \
            else f"{pattern.sparsity:g} of the parameters"
        if getattr(method.options, "attention", 0):
            shape += f" and {method.options.attention:g} of the KV groups"
    elif pattern.is_nm:
        shape = f"{pattern.n}:{pattern.m}"
    else:
        shape = f"{pattern.sparsity:g} unstructured"
    parts = [f"model {rec.model.name}", f"method {method.name} ({shape})"]
    warnings = []
    if plan.calib_source is not None:
        c = rec.calib
        parts.append(f"calibration {plan.calib_source.name}:{plan.calib_source.split} {c.nsamples} x {c.seqlen} "
                     f"seed {c.seed}")
        if facts.context is not None and c.seqlen > facts.context:
            warnings.append(f"calibration --seqlen {c.seqlen} is longer than the model's context "
                            f"({facts.context} tokens); positions beyond it were never trained")
    else:
        parts.append("calibration none (data-free)")
    ev = rec.eval
    evals = [f"{s.name} {ev.seqlen}" + (f" x {ev.windows} windows" if ev.windows else "") for s in plan.eval_sources]
    if plan.tasks is not None:
        evals.append("zero-shot " + ",".join(plan.tasks.names) + (f" (first {ev.limit})" if ev.limit else ""))
    parts.append("evaluation " + (", ".join(evals) + (" (dense too)" if ev.dense else "") if evals else "none"))
    parts.append(f"output {rec.output}" + (" (streamed)" if streamed else "") if rec.output else "output not saved")
    devices = ",".join(str(d) for d in (plan.device, *plan.extra_devices))
    parts.append(f"device {devices} {str(pick_dtype(rec.model.dtype, plan.device)).removeprefix('torch.')}")
    work = f"{facts.layers if facts.layers is not None else '?'} layers"
    if plan.calib_source is not None:
        work += f", {rec.calib.nsamples * rec.calib.seqlen:,} calibration tokens"
    parts.append(work)
    return PlanSummary("; ".join(parts), warnings, facts)
