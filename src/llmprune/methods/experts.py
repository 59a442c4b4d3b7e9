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
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import LLMPruneError
from ..models.moe import EXPERT_COUNT_KEYS, ExpertGroup, routed_inputs
from ..models.roles import role_of
from ..models.view import DecoderLayer, ModelView
from .base import METHODS, Method, MethodOptions


class ExpertPruningOptions(MethodOptions):
    pass


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

    def validate(self, view: ModelView) -> None:
        if self.pattern.is_nm:
            raise LLMPruneError(f"{self.name} removes whole experts; give --sparsity (the fraction of experts per "
                                f"layer), not an N:M pattern")
        groups = [g for layer in view.layers for g in layer.experts]
        if not groups:
            raise LLMPruneError(f"{self.name} removes routed experts, but {type(view.model).__name__} has no "
                                f"Mixture-of-Experts layer (no experts module was found); use a dense method")
        counts = {g.num_experts for g in groups}
        if len(counts) != 1:
            raise LLMPruneError(f"the MoE layers have different expert counts {sorted(counts)}; {self.name} removes the "
                                f"same count from every layer")
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
        for config in _configs(view.model):
            n_group = getattr(config, "n_group", None)
            if isinstance(n_group, int) and n_group > 1:
                raise LLMPruneError(f"grouped routing (n_group={n_group}) would need every group to lose the same "
                                    f"number of experts; expert pruning supports n_group=1 only")
        self.model = view.model

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
            remove = experts_to_remove(group.num_experts, self.pattern.sparsity)
            order = torch.sort(saliency, stable=True).indices  # lowest first; ties: lower index first
            removed = sorted(order[:remove].tolist())
            keep = [e for e in range(group.num_experts) if e not in removed]
            tokens = acc["tokens"].long().tolist()
            remove_experts_(layer, group, keep, self.model)
            report[group.path] = {"score": self.score_name, "saliency": [round(float(s), 6) for s in saliency],
                                  "tokens": tokens, "removed": removed, "kept": len(keep), "unrouted": [
                                      e for e, t in enumerate(tokens) if t == 0], "calib": "routed"}
        return {"experts": report, "sparsity": {}}


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
