"""The structured baselines CFSP is compared with: magnitude-SP, Wanda-SP and FLAP.

magnitude-SP and Wanda-SP keep the same fraction of channels in every layer. FLAP (An et al.,
AAAI 2024) scores channels by the fluctuation of their input times the squared output column
norm, standardizes the scores within each layer and removes the lowest ones under one global
threshold (so layers get different widths), then folds the mean of the removed inputs into the
output linear's bias so each layer's output keeps its expected value. A layer that the global
threshold would empty keeps its best channel. This implementation prunes
MLP channels only, like the other methods here, so ``--sparsity`` means the same for all of them.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..errors import LLMPruneError
from ..models.surgery import MlpGroup
from ..models.view import ModelView
from ..sparsity import channels
from ..sparsity.allocation import channel_counts
from .base import METHODS
from .structured import ChannelMethod, ChannelOptions, LayerChannelStats


@METHODS.register("magnitude-sp")
class MagnitudeSP(ChannelMethod):
    name = "magnitude-sp"
    summary = "structured: MLP channels by output column norm, uniform widths"

    def channel_scores(self, group: MlpGroup, stats: LayerChannelStats) -> Tensor:
        return channels.magnitude_sp(group.output.weight)


@METHODS.register("wanda-sp")
class WandaSP(ChannelMethod):
    name = "wanda-sp"
    summary = "structured: MLP channels by mean |W| x ||X||, uniform widths (An et al. 2024)"

    def channel_scores(self, group: MlpGroup, stats: LayerChannelStats) -> Tensor:
        return channels.wanda_sp(group.output.weight, stats.sq_norm)


class FlapOptions(ChannelOptions):
    fluctuation: Literal["variance", "reference"] = Field(
        "variance", description="variance = the unbiased variance of each input over all calibration tokens; "
        "reference = the released add_batch's running form, in which the first sample never counts")
    count: Literal["round", "reference"] = Field(
        "round", description="channels removed over all layers: round = round(n * ratio); reference = "
        "n - int(n * (1 - ratio)), as released")
    faithful: bool = Field(False, description="the released code (CASIA-IVA-Lab/FLAP 3bb57db, MLP channels): "
                           "fluctuation=reference, count=reference")

    faithful_form = ("flap", {"fluctuation": "reference", "count": "reference"})


@METHODS.register("flap")
class Flap(ChannelMethod):
    name = "flap"
    summary = "structured: fluctuation x column norm^2, standardized, global threshold, bias compensation (An et al. 2024)"
    adds_out_bias = True
    Options = FlapOptions

    def channel_scores(self, group: MlpGroup, stats: LayerChannelStats) -> Tensor:
        if getattr(self.options, "fluctuation", "variance") == "reference":
            if stats.fluctuation is None:
                raise LLMPruneError("flap fluctuation=reference needs statistics gathered on one device, sample by "
                                    "sample (run on one device, or use fluctuation=variance)")
            return channels.flap(group.output.weight, stats.fluctuation)
        return channels.flap(group.output.weight, stats.variance)

    def allocate(self, view: ModelView, scores: dict[int, Tensor]) -> list[int]:
        """One threshold over the per-layer standardized scores removes the requested fraction."""
        idx = [layer.index for layer in view.layers]
        z = torch.cat([channels.standardize(scores[i]) for i in idx])
        n = z.numel()
        reference = getattr(self.options, "count", "round") == "reference"
        remove = n - int(n * (1.0 - self.mlp_ratio)) if reference else int(round(self.mlp_ratio * n))
        removed = torch.zeros(z.numel(), dtype=torch.bool)
        removed[torch.argsort(z, stable=True)[:remove]] = True
        per_layer = removed.reshape(len(idx), -1).sum(dim=1)
        keep = 1.0 - per_layer.double() / self.dense_width
        counts = channel_counts(keep, self.dense_width, self.options.round_to)  # type: ignore[attr-defined]
        return [max(c, 1) for c in counts]

    def out_bias_delta(self, layer_index: int, group: MlpGroup, removed: Tensor) -> Tensor | None:
        mean = self.layer_stats[layer_index].mean.to(group.output.weight.device)
        w = group.output.weight.detach().float()
        return w[:, removed] @ mean[removed]
