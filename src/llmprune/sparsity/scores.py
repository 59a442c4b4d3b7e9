"""Importance scores: higher = more important = kept."""

from __future__ import annotations

from torch import Tensor


def magnitude(weight: Tensor) -> Tensor:
    """|W| (magnitude pruning)."""
    return weight.float().abs()


def wanda(weight: Tensor, in_sq_norm: Tensor) -> Tensor:
    """|W_ij| * ||X_j||_2 (Wanda, Sun et al. 2023, eq. 1). in_sq_norm: (in_features,) sum of x_j^2."""
    return weight.float().abs() * in_sq_norm.float().sqrt().unsqueeze(0)
