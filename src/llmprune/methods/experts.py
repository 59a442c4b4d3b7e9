"""Expert pruning of Mixture-of-Experts models: remove whole routed experts, keep a stock checkpoint.

``--sparsity`` is the fraction of each MoE layer's routed experts removed; every layer loses the
same count (rounded to the nearest expert), so the config's single expert count stays true and
stock ``from_pretrained`` (and vLLM) load the result. Per layer, the experts with the lowest score
go:

* ``reap`` (Lasby et al. 2025, "REAP: Router-weighted Expert Activation Pruning"): the mean, over
  the calibration tokens the router sends to the expert, of the router weight times the L2 norm of
  the expert's output, ``S_j = mean_{x in X_j} g_j(x) * ||f_j(x)||_2``;
* ``expert-frequency`` (the baseline): how many calibration tokens the router sends to the expert.

Routing comes from the model's real forward: the experts module's inputs (``top_k_index``,
``top_k_weights``) are recorded, the router is never re-implemented. Layer ``i`` is scored on the
outputs of the already pruned layers ``0..i-1``.

Removing an expert rewrites every tensor whose leading dimension is the expert count: the fused
expert weights (and biases), the router's rows, its bias and DeepSeek's ``e_score_correction_bias``;
then the modules' and the config's expert counts. Grouped routing (DeepSeek's ``n_group`` > 1) is
refused: the groups would have to lose equal counts.

``method.per_layer=true`` removes the same total, ``round(sparsity x all routed experts)``, but lets
the count differ per layer: every layer is scored on the dense model's activations (nothing is
removed until all layers were seen), each score is divided by its layer's mean score so that
layers compare, and the globally lowest go, no layer keeping fewer than its top-k. The per-layer
counts are recorded in the saved config (``llmprune_structure.experts_per_layer``, the config's
expert count being the largest); :func:`llmprune.load` rebuilds each layer to its count, stock
``from_pretrained`` refuses the checkpoint (a size mismatch). It decides after the last layer, so it
is streamed in two passes, as the structured methods are: every layer scored, the plan, then every layer
reloaded and rewritten without its planned experts.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from ..errors import LLMPruneError
from ..models.moe import EXPERT_COUNT_KEYS, ExpertGroup, routed_inputs
from ..models.roles import role_of
from ..models.view import DecoderLayer, ModelView
from .base import METHODS, Method, MethodOptions


class ExpertPruningOptions(MethodOptions):
    per_layer: bool = Field(False, description="remove round(sparsity x all routed experts) in total, the count per "
                            "layer by saliency (each layer's scores over their mean; every layer keeps at least its "
                            "top-k); the result loads with llmprune.load, not stock from_pretrained. false: the same "
                            "count in every layer (a stock checkpoint)")


def _configs(model: nn.Module) -> list[Any]:
    config = getattr(model, "config", None)
    return [c for c in (config, getattr(config, "text_config", None)) if c is not None]


def experts_to_remove(num_experts: int, fraction: float) -> int:
    return int(math.floor(num_experts * fraction + 0.5))


class ExpertPruning(Method):
    """Scores each routed expert on the tokens routed to it and removes the lowest-scoring ones."""

    summary = ""
    Options = ExpertPruningOptions
    stats = None  # the method records the experts modules' routed inputs itself
    score_name: ClassVar[str] = ""

    def __init__(self, pattern: Any, options: MethodOptions) -> None:
        super().__init__(pattern, options)
        self.model: nn.Module | None = None
        # per_layer: each layer's saliencies (layer index -> experts path -> scores) and report entries until
        # the end, then the plan (layer index -> experts path -> removed experts)
        self._saliency: dict[int, dict[str, Tensor]] = {}
        self._entries: dict[int, dict[str, dict[str, Any]]] = {}
        self.removal: dict[int, dict[str, list[int]]] | None = None
        self._old_count = 0

    @property
    def per_layer(self) -> bool:
        return bool(getattr(self.options, "per_layer", False))

    def validate(self, view: ModelView) -> None:
        if self.pattern.is_nm:
            raise LLMPruneError(f"{self.name} removes whole experts; give --sparsity (the fraction of experts per "
                                f"layer), not an N:M pattern")
        groups = [g for layer in view.layers for g in layer.experts]
        if not groups:
            raise LLMPruneError(f"{self.name} removes routed experts, but {type(view.model).__name__} has no "
                                f"Mixture-of-Experts layer (no experts module was found); use a dense method")
        if self.per_layer:
            self._validate_per_layer(groups)
        else:
            self._validate_uniform(groups)
        for config in _configs(view.model):
            n_group = getattr(config, "n_group", None)
            if isinstance(n_group, int) and n_group > 1:
                raise LLMPruneError(f"grouped routing (n_group={n_group}) would need every group to lose the same "
                                    f"number of experts; expert pruning supports n_group=1 only")
        self.model = view.model
        self._saliency, self._entries, self.removal = {}, {}, None

    def _validate_uniform(self, groups: list[ExpertGroup]) -> None:
        counts = {g.num_experts for g in groups}
        if len(counts) != 1:
            raise LLMPruneError(f"the MoE layers have different expert counts {sorted(counts)}; {self.name} removes the "
                                f"same count from every layer (method.per_layer=true allows different counts)")
        total = counts.pop()
        remove = experts_to_remove(total, self.pattern.sparsity)
        keep = total - remove
        top_k = max((g.top_k or 1) for g in groups)
        if remove == 0:
            raise LLMPruneError(f"--sparsity {self.pattern.sparsity} of {total} experts removes none; choose at least "
                                f"{1 / total:.4f}")
        if keep <= 0:
            raise LLMPruneError(f"--sparsity {self.pattern.sparsity} would remove every one of the {total} experts "
                                f"of each layer")
        if keep < top_k:
            raise LLMPruneError(f"--sparsity {self.pattern.sparsity} leaves {keep} of {total} experts per layer, fewer "
                                f"than the {top_k} each token is routed to (top-k); keep at least {top_k}")

    def _validate_per_layer(self, groups: list[ExpertGroup]) -> None:
        total = sum(g.num_experts for g in groups)
        remove = experts_to_remove(total, self.pattern.sparsity)
        removable = sum(g.num_experts - (g.top_k or 1) for g in groups)
        if remove == 0:
            raise LLMPruneError(f"--sparsity {self.pattern.sparsity} of the {total} routed experts removes none; "
                                f"choose at least {1 / total:.4f}")
        if remove >= total:
            raise LLMPruneError(f"--sparsity {self.pattern.sparsity} would remove every one of the {total} routed "
                                f"experts")
        if remove > removable:
            raise LLMPruneError(f"--sparsity {self.pattern.sparsity} would remove {remove} of the {total} routed "
                                f"experts, but at most {removable} can go with every layer keeping its top-k "
                                f"(fewer than the top-k experts would be left in some layer)")

    def score(self, group: ExpertGroup, x: Tensor, index: Tensor, weights: Tensor, acc: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def saliency(self, acc: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def prune_layer(self, ctx: Any) -> dict[str, Any]:
        layer: DecoderLayer = ctx.layer
        report: dict[str, Any] = {}
        for group in list(layer.experts):
            acc: dict[str, Tensor] = {"tokens": torch.zeros(group.num_experts, dtype=torch.float64)}
            for args, kwargs, _out in ctx.capture_io(group.module):
                x, index, weights = routed_inputs(args, kwargs)
                for e in range(group.num_experts):
                    acc["tokens"][e] += int((index == e).sum())
                self.score(group, x, index, weights, acc)
            saliency = self.saliency(acc)
            tokens = acc["tokens"].long().tolist()
            entry: dict[str, Any] = {"score": self.score_name, "saliency": [round(float(s), 6) for s in saliency],
                                     "tokens": tokens}
            report[group.path] = entry
            if self.per_layer:  # removed once every layer was scored (finalize)
                entry.update(unrouted=[e for e, t in enumerate(tokens) if t == 0], calib="routed")
                self._saliency.setdefault(layer.index, {})[group.path] = saliency
                self._entries.setdefault(layer.index, {})[group.path] = entry
                continue
            remove = experts_to_remove(group.num_experts, self.pattern.sparsity)
            order = torch.sort(saliency, stable=True).indices  # lowest first; ties: lower index first
            removed = sorted(order[:remove].tolist())
            keep = [e for e in range(group.num_experts) if e not in removed]
            remove_experts_(layer, group, keep, self.model)
            entry.update(removed=removed, kept=len(keep), unrouted=[e for e, t in enumerate(tokens) if t == 0],
                         calib="routed")
        return {"experts": report, "sparsity": {}}

    def finalize(self, view: ModelView) -> dict[str, Any]:
        """``per_layer`` in memory: plan the removals over all layers, remove them, record the counts."""
        if not self.per_layer or not self._saliency:
            return {}
        self.plan_removal(view)
        for layer in view.layers:
            self.apply_removal(layer)
        self.fill_reports([{"layer": i, "experts": e} for i, e in self._entries.items()])
        return self.structure_report(view)

    # --- per_layer: the plan, then each layer's removal (a streamed run: two passes, as the structured
    # methods stream; api._remove_structure_streamed) ---------------------------------------------------

    def plan_removal(self, view: ModelView) -> None:
        """Which experts every layer loses: the total by the lowest normalized saliencies (allocate_removals)."""
        items = [(layer, g) for layer in view.layers for g in layer.experts]
        missing = [layer.index for layer, g in items if g.path not in self._saliency.get(layer.index, {})]
        if missing:
            raise LLMPruneError(f"{self.name}: no expert scores for layers {missing}")
        plan = allocate_removals([self._saliency[layer.index][g.path] for layer, g in items],
                                 [g.top_k or 1 for _, g in items],
                                 experts_to_remove(sum(g.num_experts for _, g in items), self.pattern.sparsity))
        self._old_count = max(g.num_experts for _, g in items)
        self.removal = {}
        for (layer, g), removed in zip(items, plan, strict=True):
            self.removal.setdefault(layer.index, {})[g.path] = removed

    def apply_removal(self, layer: DecoderLayer) -> dict[str, Any]:
        """Remove the planned experts of ``layer`` (its tensors, or on the meta device only its shapes)."""
        assert self.removal is not None, "plan_removal first"
        report = {}
        for group in list(layer.experts):
            removed = self.removal[layer.index][group.path]
            keep = [e for e in range(group.num_experts) if e not in removed]
            remove_experts_(layer, group, keep, None)
            report[group.path] = {"removed": removed, "kept": len(keep)}
        return {"experts": report, "sparsity": {}}

    apply_removal_shape = apply_removal  # layers written before a streamed run was interrupted

    def layer_state(self, index: int) -> dict[str, Any]:
        """What the observing pass of a streamed run keeps of layer ``index``."""
        return {"saliency": self._saliency.get(index, {})}

    def restore_layer_state(self, index: int, state: dict[str, Any]) -> None:
        if state["saliency"]:
            self._saliency[index] = state["saliency"]

    def fill_reports(self, layer_reports: list[dict[str, Any]]) -> None:
        """Write the plan (removed experts, count kept) into the layers' expert reports."""
        assert self.removal is not None, "plan_removal first"
        for report in layer_reports:
            for path, entry in (report.get("experts") or {}).items():
                removed = self.removal[report["layer"]][path]
                entry.update(removed=removed, kept=len(entry["tokens"]) - len(removed))

    def structure_report(self, view: ModelView) -> dict[str, Any]:
        """Record the per-layer counts in the config (every layer already has them, on the meta device too)."""
        record_expert_counts(view, self._old_count)
        return {}


@METHODS.register("reap")
class Reap(ExpertPruning):
    name = "reap"
    summary = "remove whole experts by router-weighted expert output norm (REAP, Lasby et al. 2025)"
    score_name = "mean over routed tokens of router weight x ||expert output||"

    def score(self, group: ExpertGroup, x: Tensor, index: Tensor, weights: Tensor, acc: dict[str, Tensor]) -> None:
        total = acc.setdefault("reap", torch.zeros(group.num_experts, dtype=torch.float64))
        for e in range(group.num_experts):
            token, slot = torch.where(index == e)
            if token.numel():
                norms = group.expert_output(e, x[token]).float().norm(dim=-1)
                total[e] += float((weights[token, slot].float() * norms).sum())

    def saliency(self, acc: dict[str, Tensor]) -> Tensor:
        return acc["reap"] / acc["tokens"].clamp_min(1)


@METHODS.register("expert-frequency")
class ExpertFrequency(ExpertPruning):
    name = "expert-frequency"
    summary = "remove the experts the router picks least often (baseline for REAP)"
    score_name = "routed calibration tokens"

    def score(self, group: ExpertGroup, x: Tensor, index: Tensor, weights: Tensor, acc: dict[str, Tensor]) -> None:
        pass

    def saliency(self, acc: dict[str, Tensor]) -> Tensor:
        return acc["tokens"]


def sync_config_counts(view: ModelView, layer_reports: list[dict[str, Any]]) -> None:
    """The config's expert count from the layer reports of a streamed run (same count in every layer).

    A streamed run resumed after its last layer was written removes nothing itself, so the config
    (updated as each layer loses its experts) still has the checkpoint's count; the reports record
    what each written layer kept."""
    kept = {g["kept"] for r in layer_reports for g in (r.get("experts") or {}).values() if "kept" in g}
    groups = [g for layer in view.layers for g in layer.experts]
    if len(kept) != 1 or not groups:
        return
    count, new = groups[-1].num_experts, kept.pop()
    if count != new:
        for config in _configs(view.model):
            for key in EXPERT_COUNT_KEYS:
                if getattr(config, key, None) == count:
                    setattr(config, key, new)


def allocate_removals(saliencies: list[Tensor], top_k: list[int], remove: int) -> list[list[int]]:
    """Which experts each group loses when ``remove`` go in total: the lowest of all scores, each divided
    by its group's mean (so that layers whose outputs have other scales compare), no group keeping
    fewer than its top-k. Ties: the earlier layer, then the lower expert index."""
    candidates = []
    for g, s in enumerate(saliencies):
        s = s.double()
        mean = float(s.mean())
        norm = s / mean if mean > 0 else torch.zeros_like(s)
        candidates += [(float(v), g, e) for e, v in enumerate(norm.tolist())]
    removed: list[list[int]] = [[] for _ in saliencies]
    for _v, g, e in sorted(candidates):
        if remove == 0:
            break
        if len(saliencies[g]) - len(removed[g]) > top_k[g]:
            removed[g].append(e)
            remove -= 1
    if remove:
        raise LLMPruneError(f"{remove} more experts would have to go than the layers' top-k allow")
    return [sorted(r) for r in removed]


def record_expert_counts(view: ModelView, old: int) -> None:
    """The config's expert count after per-layer removal: the largest count left; and, where the layers'
    counts differ, each layer's (None: a dense layer) under ``llmprune_structure.experts_per_layer``, from
    which :func:`llmprune.models.loading.load_structured` rebuilds the model."""
    from ..models.surgery import STRUCTURE_KEY

    counts = [sum(g.num_experts for g in layer.experts) if layer.experts else None for layer in view.layers]
    present = [c for c in counts if c is not None]
    for config in _configs(view.model):
        for key in EXPERT_COUNT_KEYS:
            if getattr(config, key, None) == old:
                setattr(config, key, max(present))
    config = view.model.config
    record = dict(getattr(config, STRUCTURE_KEY, None) or {})
    record.pop("experts_per_layer", None)
    if len(set(present)) > 1:
        record["experts_per_layer"] = counts
    if record:
        setattr(config, STRUCTURE_KEY, record)
    elif hasattr(config, STRUCTURE_KEY):
        delattr(config, STRUCTURE_KEY)


def _slice_leading_(module: nn.Module, count: int, keep: Tensor) -> list[str]:
    """Keep rows ``keep`` of the module's own parameters and buffers whose leading dimension is ``count``."""
    changed = []
    for name, param in list(module.named_parameters(recurse=False)):
        if param.dim() >= 1 and param.shape[0] == count:
            setattr(module, name, nn.Parameter(param.data[keep.to(param.device)].clone(),
                                               requires_grad=param.requires_grad))
            changed.append(name)
    for name, buf in list(module.named_buffers(recurse=False)):
        if buf is not None and buf.dim() >= 1 and buf.shape[0] == count:
            module._buffers[name] = buf[keep.to(buf.device)].clone()
            changed.append(name)
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if getattr(module, key, None) == count:
            setattr(module, key, int(keep.numel()))
    return changed


def remove_experts_(layer: DecoderLayer, group: ExpertGroup, keep: list[int], model: nn.Module | None) -> None:
    """Keep only experts ``keep`` (in order) of ``group``: fused weights, router rows and biases, the modules'
    and the config's expert counts; the layer's linears are renumbered to match."""
    count = group.num_experts
    index = torch.tensor(keep, dtype=torch.long)
    with torch.no_grad():
        _slice_leading_(group.module, count, index)
        if group.router is not None:
            _slice_leading_(group.router, count, index)
            if isinstance(group.router, nn.Linear):
                group.router.out_features = len(keep)
        for key in ("num_experts", "n_routed_experts"):
            if getattr(group.block, key, None) == count:
                setattr(group.block, key, len(keep))
    for name in list(group.linears):
        layer.linears.pop(name, None)
        layer.roles.pop(name, None)
    group.num_experts = len(keep)
    for name, linear in group.build_linears().items():
        layer.linears[name] = linear  # type: ignore[assignment]
        layer.roles[name] = role_of(name)  # type: ignore[assignment]
    if model is not None:
        for config in _configs(model):
            for key in EXPERT_COUNT_KEYS:
                if getattr(config, key, None) == count:
                    setattr(config, key, len(keep))
