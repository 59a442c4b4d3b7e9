"""Importance scores: higher = more important = kept."""

from __future__ import annotations

from torch import Tensor


def magnitude(weight: Tensor) -> Tensor:
    """|W| (magnitude pruning)."""
    return weight.float().abs()


def wanda(weight: Tensor, in_sq_norm: Tensor) -> Tensor:
    """|W_ij| * ||X_j||_2 (Wanda, Sun et al. 2023, eq. 1). in_sq_norm: (in_features,) sum of x_j^2."""
    # |w| is exact in the weight's own dtype; the product is computed in float32 by type promotion,
    # equal to (w.float().abs() * norm) without materialising a float32 copy of the weight first.
    return weight.abs() * in_sq_norm.float().sqrt().unsqueeze(0)
