"""Magnitude pruning: remove the smallest |W| (per matrix by default, as in the Wanda paper's baseline).

Data-free unless ``allocation=owl`` (OWL's outlier ratios are measured on calibration activations)
or ``reconstruct`` (the kept weights are re-solved from each linear's input Hessian): the run then
reads calibration text.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import Tensor, nn

from ..sparsity.scores import magnitude
from ..sparsity.select import prune_mask
from .base import METHODS, AllocationOptions, MaskMethod, ReconstructOptions


class MagnitudeOptions(ReconstructOptions, AllocationOptions):
    scope: Literal["matrix", "row"] = Field("matrix", description="matrix = the smallest |W| of the whole linear "
                                            "(the Wanda paper's baseline); row = of each output row")


@METHODS.register("magnitude")
class Magnitude(MaskMethod):
    name = "magnitude"
    summary = "smallest |W| removed; data-free baseline"
    Options = MagnitudeOptions
    needs_calibration = False  # per instance: True with reconstruct (see Method.__init__)
    stats = None

    def prune_mask_of(self, name: str, linear: nn.Linear, stats: Any) -> Tensor:
        return prune_mask(magnitude(linear.weight), self.pattern)
