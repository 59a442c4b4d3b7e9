"""Importance scores: higher = more important = kept."""

from __future__ import annotations

import torch
from torch import Tensor


def magnitude(weight: Tensor) -> Tensor:
    """|W| (magnitude pruning)."""
    return weight.float().abs()


def wanda(weight: Tensor, in_sq_norm: Tensor) -> Tensor:
    """|W_ij| * ||X_j||_2 (Wanda, Sun et al. 2023, eq. 1). in_sq_norm: (in_features,) sum of x_j^2."""
    # One float32 copy, then in-place ops of one dtype: the same values as w.float().abs() * norm,
    # ~3x faster than that (two float32 temporaries) and ~2x faster than a mixed-dtype product on a
    # bf16 4096 x 11008 matrix on this project's 2-core machines.
    return weight.detach().to(torch.float32, copy=True).abs_().mul_(in_sq_norm.float().sqrt().unsqueeze(0))
