"""SparseGPT: OBS pruning with weight reconstruction from the input Hessian (Frantar & Alistarh, 2023)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..sparsity.obs_solver import sparsegpt_prune
from .base import METHODS, Method, SequentialOptions, zero_fraction


class SparseGPTOptions(SequentialOptions):
    scope: Literal["matrix", "row"] = Field("matrix", description="matrix = per column block, as the reference")
    block_size: int = Field(128, ge=1)
    damp: float = Field(0.01, gt=0, description="dampening as a fraction of the mean Hessian diagonal")


@METHODS.register("sparsegpt")
class SparseGPT(Method):
    name = "sparsegpt"
    summary = "OBS pruning with weight reconstruction (Frantar & Alistarh 2023)"
    Options = SparseGPTOptions
    stats = "hessian"

    def prune_linear(self, name: str, linear: nn.Linear, stats: Any) -> float:
        opts: SparseGPTOptions = self.options  # type: ignore[assignment]
        new_weight, _ = sparsegpt_prune(linear.weight, stats.hessian, self.pattern, block_size=opts.block_size,
                                        damp=opts.damp)
        with torch.no_grad():
            linear.weight.copy_(new_weight.to(linear.weight.dtype))
        return zero_fraction(linear)
