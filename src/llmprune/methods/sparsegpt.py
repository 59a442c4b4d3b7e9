"""SparseGPT: OBS pruning with weight reconstruction from the input Hessian (Frantar & Alistarh, 2023)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from ..sparsity.obs_solver import sparsegpt_prune
from .base import METHODS, Method, MethodOptions, zero_fraction


class SparseGPTOptions(MethodOptions):
    scope: Literal["matrix", "row"] = Field("matrix", description="matrix = per column block, as the reference")
    block_size: int = Field(128, ge=1)
    damp: float = Field(0.01, gt=0, description="dampening as a fraction of the mean Hessian diagonal")


@METHODS.register("sparsegpt")
class SparseGPT(Method):
    name = "sparsegpt"
    summary = "OBS pruning with weight reconstruction (Frantar & Alistarh 2023)"
    Options = SparseGPTOptions
    stats = "hessian"

    def prune_layer(self, ctx: Any) -> dict[str, Any]:
        opts: SparseGPTOptions = self.options  # type: ignore[assignment]
        out = {}
        for name, linear in ctx.layer.linears.items():
            hessian = ctx.stats[name].hessian
            new_weight, _ = sparsegpt_prune(
                linear.weight, hessian, self.pattern, block_size=opts.block_size, damp=opts.damp
            )
            with torch.no_grad():
                linear.weight.copy_(new_weight.to(linear.weight.dtype))
            out[name] = zero_fraction(linear)
        return {"sparsity": out}
