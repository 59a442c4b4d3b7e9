"""Reconstruction as a shared step: re-solve the kept weights of a fixed mask from the dense weights.

A pruner that only chooses *which* weights stay (magnitude, Wanda, LLM-Barber's rebuilt masks)
leaves the kept ones at their dense values. ``method.reconstruct`` re-solves them, for the chosen
mask, to reproduce the dense linear's calibration outputs: for a linear with dense weights W0, its
input Hessian H = X^T X and its mask, each row's kept weights minimize ||X (w - w0)||^2 with the
pruned ones held at zero. Two solvers (``method.reconstruct_solver``):

* ``"obs"``: SparseGPT's column-by-column OBS updates with the mask fixed
  (:func:`.obs_solver.sparsegpt_prune` with ``mask``); on SparseGPT's own mask this is SparseGPT,
  bit for bit.
* ``"exact"``: one least-squares problem per output row (:func:`.exact_solver.masked_least_squares`),
  whose calibration error is never larger than the OBS updates' for the same mask.

Linears fed the very same input (q/k/v, gate/up: one statistics object, see
``LayerContext.shared_input_groups``) are solved as one stacked matrix: rows are independent in
both solvers, so the result is the same as one by one, with one factorization of H.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .exact_solver import masked_least_squares
from .obs_solver import sparsegpt_prune_stacked
from .patterns import Pattern

Solver = Literal["obs", "exact"]
SOLVERS: tuple[str, ...] = ("obs", "exact")


def reconstruct(weights: Sequence[Tensor], hessian: Tensor, masks: Sequence[Tensor], solver: Solver, *,
                damp: float = 0.01, start: Sequence[Tensor] | None = None) -> list[Tensor]:
    """The kept weights of ``weights`` (dense, linears sharing the input Hessian ``hessian``) re-solved
    for ``masks`` (bool, True = pruned) by ``solver``; float32 tensors of the weights' shapes, zero
    exactly where the masks are True.

    ``start`` (``"exact"`` only): the OBS solution for these masks when the caller already has it
    (SparseGPT's own result), the conjugate gradients' starting point instead of recomputing it."""
    if len(masks) != len(weights) or (start is not None and len(start) != len(weights)):
        raise ValueError(f"need one mask (and start) per weight, got {len(masks)} masks for {len(weights)} weights")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    rows = [int(w.shape[0]) for w in weights]
    if solver == "exact":
        stacked = masked_least_squares(
            torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach(), hessian,
            torch.cat(list(masks)) if len(masks) > 1 else masks[0], damp=damp,
            start=None if start is None else torch.cat(list(start)) if len(start) > 1 else start[0])
        return list(stacked.split(rows))
    solved = sparsegpt_prune_stacked([w.detach() for w in weights], hessian, Pattern(0.0), damp=damp,
                                     masks=list(masks))
    return [w for w, _ in solved]
