"""Recipes: every value that affects the numbers, as typed data that round-trips through YAML.

Sources merge in this order: defaults < recipe file < explicit CLI flags / API arguments <
``--set section.key=value`` overrides. Unknown keys and bad values fail at load time. Method
options live flat under ``method`` (``method.ratio``) and are checked against the chosen method's
own option schema; the saved recipe has every option resolved, defaults included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import LLMPruneError, did_you_mean


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    name: str = "smollm2-135m"
    dtype: str = Field("auto", description="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16")
    device: str = Field("auto", description="compute device: auto, cpu, cuda, cuda:1 ..., or a comma-separated list "
                        "(cuda:0,cuda:1): the first prunes, all share the calibration forwards")
    stream: Literal["auto", "on", "off"] = Field(
        "auto", description="load, prune and write one decoder layer at a time from the checkpoint's shards "
        "(resumable); auto: when the checkpoint is larger than half the available memory")


class CalibSpec(_Strict):
    dataset: str = "c4"
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(2048, ge=2)
    seed: int = 0
    batch_size: int = Field(1, ge=1, description="calibration windows per forward")
    offload: bool = Field(False, description="keep cached activations on the CPU when computing on a GPU")
    moe: str = Field("routed", description="Mixture-of-Experts: routed = each expert is calibrated on the tokens "
                     "its router sends it; all = every token through every expert (statistics only)")


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = "wanda"
    sparsity: float | None = None
    pattern: str | None = None

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EvalSpec(_Strict):
    datasets: list[str] = Field(default_factory=list)
    seqlen: int = Field(2048, ge=2)
    windows: int | None = Field(None, ge=1)
    dense: bool = Field(True, description="also evaluate the model before pruning")
    tasks: list[str] = Field(default_factory=list, description="zero-shot lm-eval tasks: paper, offline or task names")
    limit: int | None = Field(None, ge=1, description="zero-shot: score only the first N documents of each task")
    num_fewshot: int = Field(0, ge=0, description="zero-shot: in-context examples per question (papers: 0)")
    batch_size: int = Field(8, ge=1, description="zero-shot: requests per forward")
    include_path: str | None = Field(None, description="zero-shot: a folder of lm-eval task YAMLs of one's own")


class MoESpec(_Strict):
    targets: Literal["all", "experts", "shared", "dense"] = Field(
        "all", description="Mixture-of-Experts: which linears the weight-pruning methods prune: all, experts (the "
        "routed experts only), shared (the shared experts only), dense (everything but the routed experts)")


class Recipe(_Strict):
    model: ModelSpec = ModelSpec()
    calib: CalibSpec = CalibSpec()
    method: MethodSpec = MethodSpec()
    eval: EvalSpec = EvalSpec()
    moe: MoESpec = MoESpec()
    data_dir: str | None = None
    output: str | None = None
    overwrite: bool = False

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def comma_list(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"a, b,"`` or ``["a", "b"]`` -> ``["a", "b"]`` (how names are given on the command line or in Python)."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    return [str(item).strip() for item in items if str(item).strip()]


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise LLMPruneError(f"cannot set {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_set(items: list[str] | None) -> list[tuple[str, Any]]:
    """Parse ``key=value`` overrides; values are read as YAML (numbers, booleans, lists)."""
    out = []
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise LLMPruneError(f"--set expects key=value (e.g. method.ratio=0.01), got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise LLMPruneError(f"--set {item!r}: cannot read the value: {exc}") from None
        out.append((key.strip(), value))
    return out


def load_recipe_dict(path: str | Path) -> dict[str, Any]:
    """A YAML recipe, or the recipe of a run folder / its ``llmprune.json`` (:mod:`llmprune.io.rerun`)."""
    from .io.rerun import read_run_report, recipe_from_report, report_path

    path = Path(path)
    found = report_path(path)
    if found is not None:
        return recipe_from_report(read_run_report(found), found)
    if not path.is_file():
        raise LLMPruneError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise LLMPruneError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise LLMPruneError(f"recipe {path} must be a mapping of sections (model, calib, method, eval, ...)")
    return data


def build_recipe(
    base: dict[str, Any] | None = None,
    fields: dict[str, Any] | None = None,
    overrides: list[tuple[str, Any]] | None = None,
    preset: str | None = None,
) -> Recipe:
    """Merge a recipe dict, dotted ``fields`` (None values are skipped) and ``--set`` overrides; a
    ``preset`` (:mod:`llmprune.presets`) fills in the method section under all of them."""
    data: dict[str, Any] = _deep_copy(base or {})
    for key, value in (fields or {}).items():
        if value is not None:
            set_path(data, key, value)
    for key, value in overrides or []:
        set_path(data, key, value)
    if preset is not None:
        from .presets import apply_preset

        data = apply_preset(preset, data)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_problem(err) for err in exc.errors())
        raise LLMPruneError(f"invalid recipe: {problems}") from None


def _problem(err: Any) -> str:
    """One pydantic error as ``calib.seqlen: ...``; an unknown key names the close known ones."""
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        section: Any = Recipe
        for key in err["loc"][:-1]:
            field = section.model_fields.get(key) if isinstance(section, type) else None
            section = field.annotation if field is not None else None
        known = list(section.model_fields) if isinstance(section, type) and issubclass(section, BaseModel) else []
        hint = did_you_mean(err["loc"][-1], known)
        return f"{where}: unknown key{hint}" + (f"; known: {', '.join(known)}" if known else "")
    return f"{where}: {err['msg']}"


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    return build_recipe(load_recipe_dict(path), overrides=parse_set(overrides))


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
