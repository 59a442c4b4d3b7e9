"""CFSP: coarse-to-fine structured pruning of MLP channels (Wang et al., arXiv 2409.13199).

Coarse: while the engine runs the dense model, each block's importance I_l (angular distance
between its input and output residual stream by default) is summed over the calibration tokens;
:func:`llmprune.sparsity.allocation.keep_fractions` turns the importances into per-block keep
fractions (more important blocks keep more). Fine: inside a block, channels are ranked by
:mod:`llmprune.sparsity.channels` (``score=faithful``: the released code's form, which ranks by the
activation norm alone; ``weight_aware``: the paper's formula normalized over channels). Channels
are then removed physically (:class:`~llmprune.methods.structured.ChannelMethod`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from ..engine.observers import InputStats
from ..models.surgery import MlpGroup
from ..models.view import ModelView
from ..sparsity import channels
from ..sparsity.allocation import Importance, block_importance, channel_counts, keep_fractions
from .base import METHODS
from .structured import ChannelMethod, ChannelOptions


class CfspOptions(ChannelOptions):
    importance: Importance = Field("angular", description="coarse block importance: angular, cosine, mse, mae, uniform")
    a: float = Field(1.0, gt=0, description="sharpness of the sigmoid allocation")
    normalize: Literal["reference", "per_token"] = Field(
        "reference", description="reference: I summed over tokens / 1e4 (as released); per_token: the same "
        "sharpness at any calibration size (equal to reference at 128 x 1024 tokens)")
    score: Literal["faithful", "weight_aware"] = Field(
        "faithful", description="fine channel score: faithful (released code, ranks by ||X|| alone) or "
        "weight_aware (the paper's formula normalized over channels)")
    b: float = Field(1.0, description="exponent of ||X_j|| on the output weights")
    c: float = Field(1.0, description="exponent of ||X_j|| on the summed weight terms")


@METHODS.register("cfsp")
class Cfsp(ChannelMethod):
    name = "cfsp"
    summary = "coarse block importance allocation + fine activation-aware channel scores (Wang et al. 2024)"
    Options = CfspOptions

    def __init__(self, pattern: Any, options: Any) -> None:
        super().__init__(pattern, options)
        self.importance: dict[int, float] = {}
        self.tokens = 0
        self.keep: list[float] = []

    def channel_scores(self, group: MlpGroup, stats: InputStats) -> Tensor:
        opts: Any = self.options
        w_ins = [part for name in group.inputs for part in group.input_rows(name).unbind(1)]
        fn = channels.cfsp_faithful if opts.score == "faithful" else channels.cfsp_weight_aware
        return fn(group.output.weight, w_ins, stats.sq_norm, b=opts.b, c=opts.c)

    def observe_layer(self, ctx: Any, group: MlpGroup, stats: InputStats) -> None:
        opts: Any = self.options
        assert ctx.outputs is not None, "cfsp propagates dense outputs"
        total = 0.0
        tokens = 0
        for h_in, h_out in zip(ctx.hidden, ctx.outputs, strict=True):
            total += block_importance(h_in, h_out, opts.importance)
            tokens += h_in.reshape(-1, h_in.shape[-1]).shape[0]
        self.importance[ctx.layer.index] = total
        self.tokens = tokens

    def allocate(self, view: ModelView) -> list[int]:
        opts: Any = self.options
        imp = torch.tensor([self.importance[layer.index] for layer in view.layers], dtype=torch.float64)
        keep = keep_fractions(imp, self.mlp_ratio, opts.a, tokens=self.tokens, normalize=opts.normalize)
        self.keep = [round(float(k), 6) for k in keep]
        return channel_counts(keep, self.dense_width, opts.round_to)

    def allocation_report(self) -> dict[str, Any]:
        return {"block_importance": [self.importance[i] for i in sorted(self.importance)],
                "keep_fractions": self.keep, "calibration_tokens": self.tokens}
