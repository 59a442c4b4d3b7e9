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

import torch
from torch import Tensor

from ..models.surgery import MlpGroup
from ..models.view import ModelView
from ..sparsity import channels
from ..sparsity.allocation import channel_counts
from .base import METHODS
from .structured import ChannelMethod, LayerChannelStats


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


@METHODS.register("flap")
class Flap(ChannelMethod):
    name = "flap"
    summary = "structured: fluctuation x column norm^2, standardized, global threshold, bias compensation (An et al. 2024)"
    adds_out_bias = True

    def channel_scores(self, group: MlpGroup, stats: LayerChannelStats) -> Tensor:
        return channels.flap(group.output.weight, stats.variance)

    def allocate(self, view: ModelView, scores: dict[int, Tensor]) -> list[int]:
        """One threshold over the per-layer standardized scores removes the requested fraction."""
        idx = [layer.index for layer in view.layers]
        z = torch.cat([channels.standardize(scores[i]) for i in idx])
        remove = int(round(self.mlp_ratio * z.numel()))
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
