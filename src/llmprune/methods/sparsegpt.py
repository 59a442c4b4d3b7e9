"""SparseGPT: OBS pruning with weight reconstruction from the input Hessian (Frantar & Alistarh, 2023)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..sparsity.obs_solver import (
    inverse_hessian_factor,
    rows_independent,
    sparsegpt_prune,
    sparsegpt_prune_stacked,
)
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

    def prune_layer(self, ctx: Any) -> dict[str, Any]:
        """Linears fed the same input (one shared statistics object: q/k/v, gate/up) are pruned as one
        stacked matrix where SparseGPT treats rows independently (N:M, ``scope="row"``): one
        factorization of H^-1 and one column loop instead of one per linear, the same result (tested).
        ``scope="matrix"`` ranks a column block over all its rows, so there each linear is pruned
        alone, from one shared factorization."""
        opts: SparseGPTOptions = self.options  # type: ignore[assignment]
        groups: dict[int, list[str]] = {}
        for name in ctx.layer.linears:
            groups.setdefault(id(ctx.stats[name]), []).append(name)
        for names in groups.values():
            linears = [ctx.layer.linears[n] for n in names]
            hessian = ctx.stats[names[0]].hessian
            if len(linears) > 1 and rows_independent(self.pattern, fixed_mask=False):
                solved = sparsegpt_prune_stacked([lin.weight for lin in linears], hessian, self.pattern,
                                                 block_size=opts.block_size, damp=opts.damp)
                with torch.no_grad():
                    for lin, (new_weight, _) in zip(linears, solved, strict=True):
                        lin.weight.copy_(new_weight.to(lin.weight.dtype))
                continue
            factor = inverse_hessian_factor(hessian, opts.damp)
            for lin in linears:  # one at a time: one float32 copy alive
                new_weight, _ = sparsegpt_prune(lin.weight, hessian, self.pattern, block_size=opts.block_size,
                                                damp=opts.damp, factor=factor)
                with torch.no_grad():
                    lin.weight.copy_(new_weight.to(lin.weight.dtype))
                del new_weight
        return {"sparsity": {name: zero_fraction(linear) for name, linear in ctx.layer.linears.items()}}

    def prune_linear(self, name: str, linear: nn.Linear, stats: Any) -> float:
        opts: SparseGPTOptions = self.options  # type: ignore[assignment]
        new_weight, _ = sparsegpt_prune(linear.weight, stats.hessian, self.pattern, block_size=opts.block_size,
                                        damp=opts.damp)
        with torch.no_grad():
            linear.weight.copy_(new_weight.to(linear.weight.dtype))
        return zero_fraction(linear)
