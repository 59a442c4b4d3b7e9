"""SparseGPT: OBS pruning with weight reconstruction from the input Hessian (Frantar & Alistarh, 2023).

``reconstruct_solver="exact"`` (an llmprune extension; default ``"obs"``, SparseGPT itself): after
SparseGPT's own pass, the kept weights are re-solved exactly for its mask from the dense weights
(:func:`llmprune.sparsity.reconstruct.reconstruct`, one least-squares problem per output row,
started from SparseGPT's result), which never raises the calibration error of the mask.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..sparsity.obs_solver import sparsegpt_prune, sparsegpt_prune_stacked
from ..sparsity.reconstruct import reconstruct
from .base import METHODS, AllocationOptions, Method, SequentialOptions, zero_fraction


class SparseGPTOptions(AllocationOptions, SequentialOptions):
    scope: Literal["matrix", "row"] = Field("matrix", description="matrix = per column block, as the reference")
    block_size: int = Field(128, ge=1)
    damp: float = Field(0.01, gt=0, description="dampening as a fraction of the mean Hessian diagonal")
    block_count: Literal["exact", "reference"] = Field(
        "exact", description="unstructured: exact = floor(s * size) weights in all (the promised sparsity); "
        "reference = int(numel * s) + 1 per column block (a threshold then <=, as released)")
    dead_columns: Literal["keep", "zero"] = Field(
        "keep", description="weights of always-zero inputs: keep = selected like any other; zero = zeroed first "
        "(as released; raises sparsity above the target)")
    reconstruct_solver: Literal["obs", "exact"] = Field(
        "obs", description="obs = SparseGPT's own column-by-column OBS updates (the paper); exact = afterwards, re-solve "
        "the kept weights exactly for SparseGPT's mask from the dense weights, one least-squares solve per output row "
        "(never a larger calibration error; an llmprune extension)")
    faithful: bool = Field(False, description="the released code (IST-DASLab/sparsegpt 147d215): matrix scope, "
                           "reference block count, dead columns zeroed")

    faithful_form = ("sparsegpt", {"scope": "matrix", "block_count": "reference", "dead_columns": "zero", "sequential": "layer",
                                  "allocation": "uniform", "reconstruct_solver": "obs"})


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
        alone, from one shared factorization. With ``reconstruct_solver="exact"`` the group's kept
        weights are then re-solved together (rows are independent there)."""
        opts: SparseGPTOptions = self.options  # type: ignore[assignment]
        exact = opts.reconstruct_solver == "exact"
        for names in ctx.shared_input_groups(ctx.layer.linears):
            linears = [ctx.layer.linears[n] for n in names]
            hessian = ctx.stats[names[0]].hessian
            dense = [lin.weight.detach().clone() for lin in linears] if exact else []
            solved = sparsegpt_prune_stacked([lin.weight for lin in linears], hessian,
                                             self.pattern, block_size=opts.block_size, damp=opts.damp,
                                             count=opts.block_count, zero_dead=opts.dead_columns == "zero")
            results = []
            with torch.no_grad():
                for lin, (new_weight, prune) in zip(linears, solved, strict=True):
                    if exact:
                        results.append((new_weight, self._exact_mask(new_weight, prune)))
                        continue
                    lin.weight.copy_(new_weight.to(lin.weight.dtype))
                    del new_weight  # solved one by one, only one float32 result is alive
                if exact:
                    final = reconstruct(dense, hessian, [p for _, p in results], "exact", damp=opts.damp,
                                        start=[w for w, _ in results])
                    del results, dense
                    for lin in linears:
                        new = final.pop(0)
                        lin.weight.copy_(new.to(lin.weight.dtype))
                        del new
        return {"sparsity": {name: zero_fraction(linear) for name, linear in ctx.layer.linears.items()}}

    def _exact_mask(self, new_weight: Tensor, prune: Tensor) -> Tensor:
        """The mask the exact re-solve keeps: SparseGPT's, plus the dead columns it zeroed
        (``dead_columns="zero"``), which would otherwise be solved back to their dense values."""
        if self.options.dead_columns == "zero":  # type: ignore[attr-defined]
            return prune | (new_weight == 0)
        return prune

    def prune_linear(self, name: str, linear: nn.Linear, stats: Any) -> float:
        opts: SparseGPTOptions = self.options  # type: ignore[assignment]
        new_weight, prune = sparsegpt_prune(linear.weight, stats.hessian, self.pattern, block_size=opts.block_size,
                                            damp=opts.damp, count=opts.block_count,
                                            zero_dead=opts.dead_columns == "zero")
        if opts.reconstruct_solver == "exact":
            (new_weight,) = reconstruct([linear.weight], stats.hessian, [self._exact_mask(new_weight, prune)], "exact",
                                        damp=opts.damp,
                                        start=[new_weight])
        with torch.no_grad():
            linear.weight.copy_(new_weight.to(linear.weight.dtype))
        return zero_fraction(linear)
