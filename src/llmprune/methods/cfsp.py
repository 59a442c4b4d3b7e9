"""CFSP: coarse-to-fine structured pruning of MLP channels (Wang et al., arXiv 2409.13199).

Coarse: while the engine runs the dense model, each block's importance I_l (angular distance
between its input and output residual stream by default) is summed over the calibration tokens;
:func:`llmprune.sparsity.allocation.keep_fractions` turns the importances into per-block keep
fractions (more important blocks keep more). Fine: inside a block, channels are ranked by
:mod:`llmprune.sparsity.channels` (``score=faithful``: the released code's form, which ranks by the
activation norm alone; ``weight_aware``: the paper's formula normalized over channels). Channels
are then removed physically (:class:`~llmprune.methods.structured.ChannelMethod`).

Defaults, and why (measured on SmolLM2-135M, ``benchmarks/results/structured/structured.json``):
``score="weight_aware"`` and ``normalize="per_token"``. The released code's behaviour is
``faithful=true`` (``score="faithful", normalize="reference", budget="reference"``: its per-layer
count ``int(n * keep) + 1`` and its rounding; docs/faithful.md lists what remains different). In a first exploration (32 x 256 C4 calibration,
WikiText-2 at 8 x 512) at 20% / 30% of MLP channels the released form gave 45.95 / 60.64, the
weight-aware score 44.80 / 61.57, per-token allocation with the faithful score 44.65 / 55.58 and
both 42.78 / 53.02 (FLAP 44.40 / 63.36, Wanda-SP 49.92 / 72.95). The reference allocation divides a
sum over tokens by a constant, so with fewer calibration tokens than the paper's it is almost
uniform; per-token normalization restores the intended sharpness. At the full protocol (32 x 2048
C4 tokens, 16 x 2048 WikiText-2 windows) the weight-aware score again wins at every ratio, and the
two normalizations trade places (per-token better at 10% and 30%, reference at 20% and 50%: at
65,536 tokens per-token is twice as sharp); ``a`` sets the sharpness explicitly.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from ..models.surgery import MlpGroup, attn_group
from ..models.view import ModelView
from ..sparsity import channels
from ..sparsity.allocation import Importance, channel_counts, keep_fractions, reference_channel_counts
from .base import METHODS
from .structured import ChannelMethod, ChannelOptions, LayerChannelStats


class CfspOptions(ChannelOptions):
    importance: Importance = Field("angular", description="coarse block importance: angular, cosine, mse, mae, uniform")
    a: float = Field(1.0, gt=0, description="sharpness of the sigmoid allocation")
    normalize: Literal["reference", "per_token"] = Field(
        "per_token", description="per_token: the reference's sharpness at any calibration size (equal to "
        "reference at 128 x 1024 tokens); reference: I summed over tokens / 1e4, as released")
    score: Literal["faithful", "weight_aware", "wanda_sp", "magnitude"] = Field(
        "weight_aware", description="fine channel score: weight_aware (the paper's formula normalized over "
        "channels), faithful (the released code, which ranks by ||X|| alone), wanda_sp (mean_i |W_ij| ||X_j||) "
        "or magnitude (output column norm), each under CFSP's allocation")
    attention: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of KV groups (a KV head with its query "
                             "heads) to remove, allocated by the same block importance; 0 = attention untouched")
    b: float = Field(1.0, description="exponent of ||X_j|| on the output weights")
    c: float = Field(1.0, description="exponent of ||X_j|| on the summed weight terms")
    budget: Literal["exact", "reference"] = Field(
        "exact", description="channels per block from its keep fraction: exact = largest remainder, the total "
        "exact (with round_to: nearest multiple, at least one multiple); reference = as released: int(n * keep) + 1, "
        "with round_to half up to the multiple and, where that is 0, every channel kept (a reference bug)")
    faithful: bool = Field(False, description="the released code (wyxscir/CFSP b2d5b13): score=faithful, "
                           "normalize=reference, budget=reference")

    faithful_form = ("cfsp", {"score": "faithful", "normalize": "reference", "budget": "reference"})


@METHODS.register("cfsp")
class Cfsp(ChannelMethod):
    name = "cfsp"
    summary = "coarse block importance allocation + fine activation-aware channel scores (Wang et al. 2024)"
    Options = CfspOptions

    def __init__(self, pattern: Any, options: Any) -> None:
        super().__init__(pattern, options)
        self.keep: list[float] = []

    def channel_scores(self, group: MlpGroup, stats: LayerChannelStats) -> Tensor:
        opts: Any = self.options
        if opts.score == "wanda_sp":
            return channels.wanda_sp(group.output.weight, stats.sq_norm)
        if opts.score == "magnitude":
            return channels.magnitude_sp(group.output.weight)
        w_ins = [part for name in group.inputs for part in group.input_rows(name).unbind(1)]
        fn = channels.cfsp_faithful if opts.score == "faithful" else channels.cfsp_weight_aware
        return fn(group.output.weight, w_ins, stats.sq_norm, b=opts.b, c=opts.c)

    def attention_ratio(self) -> float:
        return float(self.options.attention)  # type: ignore[attr-defined]

    def allocate_attention(self, view: ModelView) -> list[int]:
        keep = self.keep_fractions(view, self.attention_ratio())
        n_kv = attn_group(view.layers[0]).kv_heads
        return [max(1, c) for c in channel_counts(keep, n_kv)]

    def importances(self, view: ModelView) -> Tensor:
        metric = self.options.importance  # type: ignore[attr-defined]
        return torch.tensor([self.layer_stats[layer.index].importance[metric] for layer in view.layers],
                            dtype=torch.float64)

    def keep_fractions(self, view: ModelView, ratio: float) -> Tensor:
        """Per-block keep fractions for ``ratio`` from the coarse block importance (MLP and attention alike)."""
        opts: Any = self.options
        tokens = self.layer_stats[view.layers[0].index].tokens
        return keep_fractions(self.importances(view), ratio, opts.a, tokens=tokens, normalize=opts.normalize,
                              double=opts.budget == "reference")

    def allocate(self, view: ModelView, scores: dict[int, Tensor]) -> list[int]:
        opts: Any = self.options
        keep = self.keep_fractions(view, self.mlp_ratio)
        self.keep = [round(float(k), 6) for k in keep]
        # At high ratios the least important block's share can round to 0 channels; it keeps one.
        if opts.budget == "reference":
            return reference_channel_counts(keep, self.dense_width, opts.round_to)
        return [max(1, c) for c in channel_counts(keep, self.dense_width, opts.round_to)]

    def allocation_report(self) -> dict[str, Any]:
        first = next(iter(self.layer_stats.values()))
        metric = self.options.importance  # type: ignore[attr-defined]
        return {"block_importance": {"metric": metric, "values": [self.layer_stats[i].importance[metric]
                                                                  for i in sorted(self.layer_stats)]},
                # Empty with method.uniform=true: no importance-driven allocation was made.
                "keep_fractions": self.keep, "calibration_tokens": first.tokens}
