"""Wanda: |W_ij| * ||X_j||_2, compared within each output row (Sun et al., 2023)."""

from __future__ import annotations

from typing import Any, Literal

from ..sparsity.scores import wanda
from ..sparsity.select import prune_mask
from .base import METHODS, Method, MethodOptions, apply_prune_mask_, zero_fraction


class WandaOptions(MethodOptions):
    scope: Literal["row", "matrix"] = "row"


@METHODS.register("wanda")
class Wanda(Method):
    name = "wanda"
    summary = "|W| x input activation norm, per output row (Sun et al. 2023)"
    Options = WandaOptions
    stats = "sq_norm"

    def prune_layer(self, ctx: Any) -> dict[str, Any]:
        out = {}
        for name, linear in ctx.layer.linears.items():
            scores = wanda(linear.weight, ctx.stats[name].sq_norm)
            apply_prune_mask_(linear, prune_mask(scores, self.pattern))
            out[name] = zero_fraction(linear)
        return {"sparsity": out}
