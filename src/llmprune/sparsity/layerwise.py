"""Layer-wise sparsity allocation for the unstructured methods: OWL (Yin et al. 2024).

OWL ("Outlier Weighed Layerwise sparsity", released code ``lib/prune.py``, ``prune_wanda_outlier``;
llm-compressor's ``sparsity_profile="owl"``) gives layers with many outliers a lower sparsity. On
the dense model, with dense propagation, it takes for each decoder layer l the Wanda metric
|W_ij| * ||X_j||_2 of every prunable linear of the layer, all concatenated, and its outlier ratio

    D_l = 100 * #(entries > m * mean(metric)) / numel      (m: ``owl_m``, OWL's Hyper_m, default 5)

then normalizes the ratios to [0, 2 * lambda] (``owl_lambda``, OWL's Lamda, default 0.08)

    N_l = (D_l - min D) / (max D - min D) * 2 * lambda

and keeps keep_l = N_l - mean(N) + (1 - s) of layer l; its sparsity is s_l = 1 - keep_l.

Our generalisation: the mean subtracted is weighted by each layer's prunable parameter count P_l,
mean_P(N) = sum P_l N_l / sum P_l, so that the parameter-weighted mean of the s_l is the target s
exactly (OWL subtracts the unweighted mean: the overall sparsity is then s only when every layer
has as many prunable weights, which is the case for the dense decoder families, where both agree
bit for bit up to rounding). When every layer has the same outlier ratio (max D = min D, where
OWL's division is 0 / 0) every layer gets s.

Since N_l - mean_P(N) lies in [-2 lambda, 2 lambda], every s_l lies in [s - 2 lambda, s + 2 lambda]:
``s - 2 lambda >= 0`` and ``s + 2 lambda < 1`` is the check made before any work
(:func:`check_owl_lambda`), sufficient whatever the ratios turn out to be.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import LLMPruneError

ALLOCATIONS: tuple[str, ...] = ("uniform", "owl")


def check_owl_lambda(sparsity: float, lam: float) -> None:
    """Refuse an ``owl_lambda`` that could push a layer's sparsity outside [0, 1) at ``sparsity``."""
    if lam < 0 or sparsity - 2 * lam < 0 or sparsity + 2 * lam >= 1:
        low = sparsity / 2
        high = (1 - sparsity) / 2
        valid = (f"0 <= method.owl_lambda <= {low:g}" if low < high
                 else f"0 <= method.owl_lambda < {high:g}")
        raise LLMPruneError(
            f"method.owl_lambda={lam:g} could push a layer's sparsity outside [0, 1) at sparsity {sparsity:g} "
            f"(OWL gives each layer a sparsity within sparsity +- 2 * owl_lambda); at this sparsity use {valid}")


def outlier_ratio(metrics: Sequence[Tensor | Callable[[], Tensor]], m: float) -> float:
    """OWL's outlier ratio (in percent) of the concatenation of ``metrics`` (the layer's linears): the
    share of entries above ``m`` times the mean of all of them. Each item is a tensor or a
    zero-argument callable that makes one; each is read twice (the mean, then the count), so
    callables are computed twice and never held together (one linear's metric at a time instead of
    the whole layer's). The mean is accumulated in float64; the comparison is in the metric's dtype
    (float32, as OWL's)."""
    total, numel = 0.0, 0
    for item in metrics:
        t = item() if callable(item) else item
        total += float(t.sum(dtype=torch.float64))
        numel += t.numel()
        del t
    if numel == 0:
        raise ValueError("no metric entries")
    threshold = total / numel * m
    above = 0
    for item in metrics:
        t = item() if callable(item) else item
        above += int(torch.count_nonzero(t > threshold))
        del t
    return 100.0 * above / numel


def owl_sparsities(ratios: Sequence[float], params: Sequence[int], sparsity: float, lam: float) -> list[float]:
    """Per-layer sparsities from OWL's outlier ratios ``ratios`` (one per layer, percent) and each
    layer's prunable parameter count ``params``; their ``params``-weighted mean is ``sparsity``
    (module docstring). Computed in float64."""
    if len(ratios) != len(params) or not ratios:
        raise ValueError(f"need one ratio per layer and one parameter count per layer, got {len(ratios)} and "
                         f"{len(params)}")
    check_owl_lambda(sparsity, lam)
    d = torch.tensor([float(r) for r in ratios], dtype=torch.float64)
    p = torch.tensor([float(n) for n in params], dtype=torch.float64)
    spread = float(d.max() - d.min())
    if spread == 0.0:
        return [float(sparsity)] * len(ratios)
    norm = (d - d.min()) / spread * (2 * lam)
    keep = norm - (norm * p).sum() / p.sum() + (1 - sparsity)
    return [min(max(1.0 - float(k), 0.0), 1.0) for k in keep]
