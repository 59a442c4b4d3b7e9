"""Wanda: |W_ij| * ||X_j||_2, compared within each output row (Sun et al., 2023)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import nn

from ..sparsity.scores import wanda
from ..sparsity.select import prune_mask
from .base import METHODS, Method, SequentialOptions, apply_prune_mask_, zero_fraction


class WandaOptions(SequentialOptions):
    scope: Literal["row", "matrix"] = "row"
    faithful: bool = Field(False, description="the released code (locuslab/wanda 8e8fc87): per-row scope, layer-wise "
                           "calibration; our defaults already are, bit for bit")

    faithful_form = ("wanda", {"scope": "row", "sequential": "layer"})


@METHODS.register("wanda")
class Wanda(Method):
    name = "wanda"
    summary = "|W| x input activation norm, per output row (Sun et al. 2023)"
    Options = WandaOptions
    stats = "sq_norm"

    def prune_linear(self, name: str, linear: nn.Linear, stats: Any) -> float:
        apply_prune_mask_(linear, prune_mask(wanda(linear.weight, stats.sq_norm), self.pattern))
        return zero_fraction(linear)
