"""Magnitude pruning: remove the smallest |W| (per matrix by default, as in the Wanda paper's baseline)."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from ..sparsity.scores import magnitude
from ..sparsity.select import prune_mask
from .base import METHODS, Method, MethodOptions, apply_prune_mask_, zero_fraction


class MagnitudeOptions(MethodOptions):
    scope: Literal["matrix", "row"] = "matrix"


@METHODS.register("magnitude")
class Magnitude(Method):
    name = "magnitude"
    summary = "smallest |W| removed; data-free baseline"
    Options = MagnitudeOptions
    needs_calibration = False
    stats = None

    def prune_linear(self, name: str, linear: nn.Linear, stats: Any) -> float:
        apply_prune_mask_(linear, prune_mask(magnitude(linear.weight), self.pattern))
        return zero_fraction(linear)
