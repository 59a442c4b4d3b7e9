"""Mask selection: ``prune_mask(scores, pattern) -> bool`` with True = prune.

Selection is exact: ties are broken by a stable sort on the score (lower index pruned first), so the
number of pruned weights in each group is always what the pattern says, never "<= threshold".
"""

from __future__ import annotations

import torch
from torch import Tensor

from .patterns import Pattern


def prune_lowest_per_row(scores: Tensor, count_per_row: int) -> Tensor:
    """Prune the ``count_per_row`` lowest-scoring entries of every row. scores: (rows, cols).

    The same mask as a stable sort (ties at the threshold: lower index pruned first), found with
    ``topk`` (a partial selection, ~5x faster than sorting 7B-sized rows on a CPU).
    """
    if count_per_row <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = torch.topk(scores, count_per_row, dim=-1, largest=False, sorted=False).values.amax(-1, keepdim=True)
    mask = scores < threshold
    need = count_per_row - mask.sum(-1, keepdim=True)  # how many of the entries equal to the threshold to prune
    tied = scores == threshold
    if bool((tied.sum(-1, keepdim=True) != need).any()):
        tied &= tied.cumsum(-1) <= need
    return mask | tied


def prune_lowest_overall(scores: Tensor, count: int) -> Tensor:
    """Prune the ``count`` lowest-scoring entries of the whole tensor."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        order = torch.sort(scores.flatten(), stable=True).indices[:count]
        flat[order] = True
    return flat.view_as(scores)


def prune_mask_n_of_m(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` best of every ``m`` consecutive inputs of each row; prune the rest.

    scores: (out_features, in_features) with in_features % m == 0.
    """
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)  # (rows, groups, m)
    lowest = torch.sort(groups, dim=-1, stable=True).indices[..., : m - n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True)
    return mask.reshape(rows, cols)


def prune_mask(scores: Tensor, pattern: Pattern) -> Tensor:
    """The prune mask (True = prune) of a score matrix under ``pattern``."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (out_features, in_features), got shape {tuple(scores.shape)}")
    scores = scores.float()
    if pattern.is_nm:
        assert pattern.n is not None and pattern.m is not None
        return prune_mask_n_of_m(scores, pattern.n, pattern.m)
    if pattern.scope == "row":
        return prune_lowest_per_row(scores, int(scores.shape[1] * pattern.sparsity))
    return prune_lowest_overall(scores, int(scores.numel() * pattern.sparsity))
