"""SparseGPT: OBS pruning with weight reconstruction from the input Hessian (Frantar & Alistarh, 2023)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..sparsity.obs_solver import sparsegpt_prune, sparsegpt_prune_stacked
from .base import METHODS, Method, SequentialOptions, zero_fraction


class SparseGPTOptions(SequentialOptions):
    scope: Literal["matrix", "row"] = Field("matrix", description="matrix = per column block, as the reference")
    block_size: int = Field(128, ge=1)
    damp: float = Field(0.01, gt=0, description="dampening as a fraction of the mean Hessian diagonal")
    block_count: Literal["exact", "reference"] = Field(
        "exact", description="unstructured: exact = floor(s * size) weights in all (the promised sparsity); "
        "reference = int(numel * s) + 1 per column block (a threshold then <=, as released)")
    dead_columns: Literal["keep", "zero"] = Field(
        "keep", description="weights of always-zero inputs: keep = selected like any other; zero = zeroed first "
        "(as released; raises sparsity above the target)")
    faithful: bool = Field(False, description="the released code (IST-DASLab/sparsegpt 147d215): matrix scope, "
                           "reference block count, dead columns zeroed")

    faithful_form = ("sparsegpt", {"scope": "matrix", "block_count": "reference", "dead_columns": "zero", "sequential": "layer"})


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
        for names in ctx.shared_input_groups(ctx.layer.linears):
            linears = [ctx.layer.linears[n] for n in names]
            solved = sparsegpt_prune_stacked([lin.weight for lin in linears], ctx.stats[names[0]].hessian,
                                             self.pattern, block_size=opts.block_size, damp=opts.damp,
                                             count=opts.block_count, zero_dead=opts.dead_columns == "zero")
            with torch.no_grad():
                for lin, (new_weight, _) in zip(linears, solved, strict=True):
                    lin.weight.copy_(new_weight.to(lin.weight.dtype))
                    del new_weight  # solved one by one, only one float32 result is alive
        return {"sparsity": {name: zero_fraction(linear) for name, linear in ctx.layer.linears.items()}}

    def prune_linear(self, name: str, linear: nn.Linear, stats: Any) -> float:
        opts: SparseGPTOptions = self.options  # type: ignore[assignment]
        new_weight, _ = sparsegpt_prune(linear.weight, stats.hessian, self.pattern, block_size=opts.block_size,
                                        damp=opts.damp, count=opts.block_count, zero_dead=opts.dead_columns == "zero")
        with torch.no_grad():
            linear.weight.copy_(new_weight.to(linear.weight.dtype))
        return zero_fraction(linear)
