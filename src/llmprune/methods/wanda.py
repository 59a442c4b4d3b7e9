"""Wanda: |W_ij| * ||X_j||_2, compared within each output row (Sun et al., 2023).

With ``reconstruct`` the engine collects X^T X instead of the column norms (their diagonal), and the
kept weights are re-solved for Wanda's mask (:mod:`llmprune.sparsity.reconstruct`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import Tensor, nn

from ..sparsity.scores import wanda
from ..sparsity.select import prune_mask
from .base import METHODS, AllocationOptions, MaskMethod, ReconstructOptions, SequentialOptions


class WandaOptions(ReconstructOptions, AllocationOptions, SequentialOptions):
    scope: Literal["row", "matrix"] = Field("row", description="row = compared within each output row (the paper); "
                                            "matrix = over the whole linear")
    faithful: bool = Field(False, description="the released code (locuslab/wanda 8e8fc87): per-row scope, layer-wise "
                           "calibration; our defaults already are, bit for bit")

    faithful_form = ("wanda", {"scope": "row", "sequential": "layer", "allocation": "uniform", "reconstruct": False})


@METHODS.register("wanda")
class Wanda(MaskMethod):
    name = "wanda"
    summary = "|W| x input activation norm, per output row (Sun et al. 2023)"
    Options = WandaOptions
    stats = "sq_norm"  # per instance: "hessian" with reconstruct (see Method.__init__)

    def prune_mask_of(self, name: str, linear: nn.Linear, stats: Any) -> Tensor:
        return prune_mask(wanda(linear.weight, stats.sq_norm), self.pattern)
