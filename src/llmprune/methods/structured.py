"""What every structured (channel-removing) method shares: budget, widths, removal, the report.

A structured method scores the MLP channels of each layer while the engine runs the *dense* model
(``propagate = "dense"``: all statistics come from one pass, as in CFSP's reference), then in
:meth:`ChannelMethod.finalize` decides how many channels each layer keeps (its ``allocate``), keeps
the highest-scoring ones and removes the others physically (:mod:`llmprune.models.surgery`).

``--sparsity`` is the fraction of MLP channels removed (``method.target=mlp``, the reference's
meaning) or of the model's parameters (``method.target=params``); the report states both.
``round_to`` rounds each layer's kept width to a multiple (128 in the CFSP paper); ``uniform``
forces the same width in every layer, which makes the result a stock checkpoint.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from ..engine.observers import InputStats
from ..errors import LLMPruneError
from ..models.roles import Role
from ..models.surgery import (
    MlpGroup,
    attn_group,
    mlp_group,
    record_structure,
    resize_attention_empty,
    resize_mlp_empty,
    shrink_attention,
    shrink_mlp,
)
from ..models.view import DecoderLayer, ModelView
from ..report import param_count
from ..sparsity.allocation import IMPORTANCE_METRICS, block_importance
from .base import Method, MethodOptions


@dataclass
class LayerChannelStats:
    """What one calibration pass records per layer; every structured method scores from this alone.

    Because scores are computed at ``finalize`` from these statistics and the (still dense)
    weights, one pass can serve several methods and ratios (``benchmarks/structured.py`` does).
    """

    sq_norm: Tensor  # (width,) sum over tokens of X_j^2, X = input of the MLP output linear
    mean: Tensor  # (width,) mean of X_j
    variance: Tensor  # (width,) variance of X_j
    tokens: int
    importance: dict[str, float]  # block importance by metric, summed over tokens
    attn_sq_norm: Tensor | None = None  # (heads * head_dim,) sum of squares of the attention output linear's input
    fluctuation: Tensor | None = None  # (width,) FLAP's fluctuation as released (InputStats.fluctuation)


class ChannelOptions(MethodOptions):
    target: Literal["mlp", "params"] = Field("mlp", description="--sparsity is a fraction of MLP channels (mlp) "
                                             "or of all model parameters (params)")
    round_to: int = Field(1, ge=1, description="round each layer's kept MLP width to a multiple of this")
    uniform: bool = Field(False, description="same width in every layer (a stock checkpoint)")


class ChannelMethod(Method):
    """Base of cfsp, magnitude-sp, wanda-sp and flap."""

    propagate = "dense"
    structured = True
    stats = "moments"
    Options = ChannelOptions
    adds_out_bias = False

    def __init__(self, pattern: Any, options: Any) -> None:
        super().__init__(pattern, options)
        self.layer_stats: dict[int, LayerChannelStats] = {}
        # Scores computed while each layer's dense weights are at hand (prune_layer), so that the
        # global step needs no weights: what lets a streamed run decide before it reloads a layer.
        self.layer_scores: dict[int, Tensor] = {}
        self.layer_kv_scores: dict[int, Tensor] = {}
        self.removal: RemovalPlan | None = None
        self.mlp_ratio = float(pattern.sparsity)
        self.dense_params = 0
        self.dense_width = 0

    # --- checks before any work -------------------------------------------------------------
    def validate(self, view: ModelView) -> None:
        if self.pattern.is_nm:
            raise LLMPruneError(f"{self.name} removes whole MLP channels; N:M patterns do not apply "
                                f"(give --sparsity only)")
        groups = [mlp_group(layer) for layer in view.layers]
        widths = {g.width for g in groups}
        if len(widths) != 1:
            raise LLMPruneError(f"{self.name} needs a model whose layers share one MLP width; found widths "
                                f"{sorted(widths)} (prune the dense model, not an already pruned one)")
        width = widths.pop()
        self.dense_width = width
        self.dense_params = param_count(view.model)
        opts: Any = self.options
        if opts.round_to > width:
            raise LLMPruneError(f"round_to={opts.round_to} is larger than the MLP width {width}; "
                                f"choose a multiple <= {width}")
        if opts.target == "params":
            per_channel = groups[0].channel_params()
            removable = per_channel * width * len(groups)
            wanted = self.pattern.sparsity * self.dense_params
            if wanted >= removable:
                raise LLMPruneError(
                    f"--sparsity {self.pattern.sparsity} of the parameters ({int(wanted):,}) is more than all MLP "
                    f"channels hold ({removable:,} = {removable / self.dense_params:.3f} of the model); "
                    f"choose a smaller --sparsity"
                )
            self.mlp_ratio = wanted / removable
        keep = (1.0 - self.mlp_ratio) * width
        if keep < 1.0:
            raise LLMPruneError(f"--sparsity {self.pattern.sparsity} would leave {keep:.2f} of {width} MLP channels "
                                f"per layer; every block needs at least one (choose a smaller --sparsity)")
        if self.attention_ratio() > 0:
            if opts.target == "params":
                raise LLMPruneError("method.target=params applies to MLP channels only; with attention pruning give "
                                    "--sparsity as the fraction of MLP channels (method.target=mlp)")
            kv = {attn_group(layer).kv_heads for layer in view.layers}  # raises where heads are not removable
            if (1.0 - self.attention_ratio()) * min(kv) < 1.0:
                raise LLMPruneError(f"method.attention={self.attention_ratio()} would leave no KV group in a layer "
                                    f"with {min(kv)} KV heads; choose a smaller fraction")

    def attention_ratio(self) -> float:
        """Fraction of KV groups to remove (0: attention untouched)."""
        return 0.0

    # --- per layer: statistics only (nothing is removed until every layer was seen) -----------
    def prune_layer(self, ctx: Any) -> dict[str, Any]:
        group = mlp_group(ctx.layer)
        st: InputStats = ctx.stats[group.output_name]
        assert ctx.outputs is not None, "structured methods propagate dense outputs"
        importance = dict.fromkeys(IMPORTANCE_METRICS, 0.0)
        for h_in, h_out in zip(ctx.hidden, ctx.outputs, strict=True):
            for metric in IMPORTANCE_METRICS:
                importance[metric] += block_importance(h_in, h_out, metric)  # type: ignore[arg-type]
        (attn_out,) = ctx.layer.by_role(Role.ATTN_OUT)
        i = ctx.layer.index
        fluctuation = st.fluctuation.cpu() if st._flap is not None else None
        self.layer_stats[i] = LayerChannelStats(
            st.sq_norm.cpu(), st.mean.cpu(), st.variance.cpu(), st.tokens, importance, ctx.stats[attn_out].sq_norm.cpu(),
            fluctuation)
        self.layer_scores[i] = self.channel_scores(group, self.layer_stats[i]).detach().float().cpu()
        if self.attention_ratio() > 0:
            self.layer_kv_scores[i] = self.kv_group_score(ctx.layer)
        return {"mlp_width": group.width, "block_importance": importance}

    # --- what a streamed run keeps of each layer between its two passes ------------------------
    def layer_state(self, index: int) -> dict[str, Any]:
        """Everything this method recorded of layer ``index`` (tensors and numbers, for torch.save)."""
        return {"stats": dataclasses.asdict(self.layer_stats[index]), "scores": self.layer_scores[index],
                "kv_scores": self.layer_kv_scores.get(index)}

    def restore_layer_state(self, index: int, state: dict[str, Any]) -> None:
        """Take back what :meth:`layer_state` gave (a resumed streamed run)."""
        self.layer_stats[index] = LayerChannelStats(**state["stats"])
        self.layer_scores[index] = state["scores"]
        if state["kv_scores"] is not None:
            self.layer_kv_scores[index] = state["kv_scores"]

    def share_statistics(self, other: Method) -> bool:
        """Every structured method scores from the same dense-pass statistics (all importance
        metrics included), whatever its options and ratio: one pass serves them all."""
        if not isinstance(other, ChannelMethod) or not other.layer_stats:
            return False
        self.layer_stats = other.layer_stats
        self.layer_scores, self.layer_kv_scores = {}, {}  # the other method's scores are not ours
        return True

    @abstractmethod
    def channel_scores(self, group: MlpGroup, stats: LayerChannelStats) -> Tensor:
        """(width,) importance of each channel of one layer (from the dense weights and the stats)."""

    # --- global: how many channels each layer keeps, then removal ----------------------------
    def allocate(self, view: ModelView, scores: dict[int, Tensor]) -> list[int]:
        """Channels kept per layer. The default is the same width in every layer."""
        return self.uniform_counts(len(view.layers))

    def uniform_counts(self, n: int) -> list[int]:
        """The same kept width in every layer: round((1 - ratio) * width), then to the multiple."""
        round_to = self.options.round_to  # type: ignore[attr-defined]
        kept = max(1, round((1.0 - self.mlp_ratio) * self.dense_width))
        if round_to > 1:
            kept = min(self.dense_width, max(round_to, round_to * round(kept / round_to)))
        return [kept] * n

    def scores(self, view: ModelView) -> dict[int, Tensor]:
        """Channel scores of every layer: those computed in :meth:`prune_layer`, else (statistics
        shared from another method) from the recorded statistics and the current, dense weights."""
        return {layer.index: self.layer_scores[layer.index] if layer.index in self.layer_scores else
                self.channel_scores(mlp_group(layer), self.layer_stats[layer.index]).detach().float().cpu()
                for layer in view.layers}

    def out_bias_delta(self, layer_index: int, group: MlpGroup, removed: Tensor) -> Tensor | None:
        """Added to the MLP output bias when ``removed`` channels go (FLAP's compensation)."""
        return None

    def allocation_report(self) -> dict[str, Any]:
        return {}

    def finalize(self, view: ModelView) -> dict[str, Any]:
        """Decide what every layer keeps, remove the rest, and report (all layers in memory)."""
        self.plan_removal(view)
        for layer in view.layers:
            self.apply_removal(layer)
        return self.structure_report(view)

    def plan_removal(self, view: ModelView) -> RemovalPlan:
        """The global decision: how many and which channels (and KV groups) each layer keeps.

        Needs only what :meth:`prune_layer` recorded (and, for shared statistics, the dense weights),
        so a streamed run plans with every layer on the meta device and applies layer by layer.
        """
        opts: Any = self.options
        missing = [layer.index for layer in view.layers if layer.index not in self.layer_stats]
        if missing:
            raise LLMPruneError(f"{self.name}: no calibration statistics for layers {missing}")
        all_scores = self.scores(view)
        # method.uniform overrides the method's own allocation (which is then not computed at all).
        counts = self.uniform_counts(len(view.layers)) if opts.uniform else self.allocate(view, all_scores)
        for layer, count in zip(view.layers, counts, strict=True):
            if count < 1:
                raise LLMPruneError(f"the allocation leaves layer {layer.index} with no MLP channels; "
                                    f"choose a smaller --sparsity or set method.uniform=true")
        keep, removed, kv_keep = {}, {}, {}
        for layer, count in zip(view.layers, counts, strict=True):
            order = torch.argsort(all_scores[layer.index], descending=True, stable=True)
            keep[layer.index], removed[layer.index] = order[:count].sort().values, order[count:]
        attention = None
        if self.attention_ratio() > 0:
            kv_scores = self.kv_group_scores(view)
            dense = [attn_group(layer).kv_heads for layer in view.layers]
            kv_counts = (ChannelMethod.allocate_attention(self, view) if opts.uniform else self.allocate_attention(view))
            for layer, count in zip(view.layers, kv_counts, strict=True):
                kv_keep[layer.index] = torch.argsort(kv_scores[layer.index], descending=True, stable=True)[:count]
            attention = {"ratio_requested": self.attention_ratio(), "kv_heads_dense": dense, "kv_heads": kv_counts,
                         "removed_fraction": round(1 - sum(kv_counts) / sum(dense), 6)}
        self.removal = RemovalPlan(counts, keep, removed, kv_keep, attention)
        return self.removal

    def apply_removal(self, layer: DecoderLayer) -> dict[str, Any]:
        """Remove what the plan drops from ``layer`` (its dense weights loaded); report its new shape."""
        assert self.removal is not None, "plan_removal first"
        keep = self.removal.keep[layer.index]
        shrink_mlp(layer, keep, self.out_bias_delta(layer.index, mlp_group(layer), self.removal.removed[layer.index]))
        report: dict[str, Any] = {"mlp_width": int(keep.numel())}
        if layer.index in self.removal.kv_keep:
            shrink_attention(layer, self.removal.kv_keep[layer.index])
            report["kv_heads"] = int(self.removal.kv_keep[layer.index].numel())
        return report

    def apply_removal_shape(self, layer: DecoderLayer) -> None:
        """Give ``layer`` (on the meta device) the shapes :meth:`apply_removal` leaves: a resumed
        streamed run's layers that were written before the interruption."""
        assert self.removal is not None, "plan_removal first"
        resize_mlp_empty(layer, int(self.removal.keep[layer.index].numel()), out_bias=self.adds_out_bias)
        if layer.index in self.removal.kv_keep:
            resize_attention_empty(layer, int(self.removal.kv_keep[layer.index].numel()))

    def structure_report(self, view: ModelView) -> dict[str, Any]:
        """The report of the removal, and the per-layer widths recorded in the model config (every
        layer already shrunk; on the meta device is fine, only shapes are read)."""
        assert self.removal is not None, "plan_removal first"
        opts: Any = self.options
        counts, attention = self.removal.counts, self.removal.attention
        checkpoint = record_structure(view, self.dense_width, self.adds_out_bias, attention_pruned=attention is not None)
        total = self.dense_width * len(view.layers)
        pruned_params = param_count(view.model)
        return {
            "target": opts.target,
            "sparsity_requested": self.pattern.sparsity,
            "mlp_channels": {"dense": total, "kept": sum(counts), "removed_fraction": round(1 - sum(counts) / total, 6),
                             "widths": counts, "dense_width": self.dense_width},
            "params": {"dense": self.dense_params, "pruned": pruned_params,
                       "removed_fraction": round(1 - pruned_params / self.dense_params, 6)},
            "round_to": opts.round_to,
            "uniform_widths": len(set(counts)) == 1,
            "checkpoint": checkpoint,
            **({"attention": attention} if attention is not None else {}),
            **self.allocation_report(),
        }

    # --- optional attention pruning: whole KV groups --------------------------------------------
    def kv_group_score(self, layer: DecoderLayer) -> Tensor:
        """One score per KV group of ``layer`` (dense weights): sum over its query heads' o_proj input
        columns of mean_i |W_o_ij| * ||X_j|| (Wanda-SP on the attention output projection)."""
        group = attn_group(layer)
        sq = self.layer_stats[layer.index].attn_sq_norm
        assert sq is not None
        o = group.linear("o").weight
        col = (o.detach().float().abs() * sq.to(o.device).sqrt()).mean(0)
        return col.reshape(group.kv_heads, group.q_per_kv * group.head_dim).sum(dim=1).cpu()

    def kv_group_scores(self, view: ModelView) -> dict[int, Tensor]:
        """:meth:`kv_group_score` of every layer (those computed in :meth:`prune_layer` when there)."""
        return {layer.index: self.layer_kv_scores[layer.index] if layer.index in self.layer_kv_scores
                else self.kv_group_score(layer) for layer in view.layers}

    def allocate_attention(self, view: ModelView) -> list[int]:
        """KV groups kept per layer; the default is the same count everywhere."""
        n_kv = attn_group(view.layers[0]).kv_heads
        return [max(1, round((1.0 - self.attention_ratio()) * n_kv))] * len(view.layers)


@dataclass
class RemovalPlan:
    """What :meth:`ChannelMethod.plan_removal` decided: MLP widths, kept channels and KV groups per layer."""

    counts: list[int]
    keep: dict[int, Tensor]  # layer index -> sorted indices of the MLP channels kept
    removed: dict[int, Tensor]  # layer index -> the others, lowest score last (the order FLAP's bias sums in)
    kv_keep: dict[int, Tensor]  # layer index -> KV groups kept (only when attention is pruned)
    attention: dict[str, Any] | None  # the attention section of the report


class RemovalStep(Method):
    """The writing pass of a streamed structured run: each layer, reloaded with its dense weights,
    loses what ``method``'s plan drops (no calibration; the engine's loop and the store do the rest)."""

    name = "removal"
    summary = "apply a structured method's plan, layer by layer"
    needs_calibration = False
    stats = None

    def __init__(self, method: ChannelMethod) -> None:
        super().__init__(method.pattern, method.options)
        self.method = method

    def prune_layer(self, ctx: Any) -> dict[str, Any]:
        return self.method.apply_removal(ctx.layer)
