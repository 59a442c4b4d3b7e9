"""Layer-wise budgets for structured pruning: block importance and CFSP's sigmoid allocation.

All functions are pure (tensors in, tensors or ints out) and are tested on hand-made values.

Block importance (coarse, CFSP eq. 1): for decoder block l with input residual stream h_in and
output h_out, ``angular`` is sum over tokens of arccos(cos(h_in, h_out)) / pi; ``cosine`` is the
sum of 1 - cos; ``mse`` and ``mae`` are the sums over tokens of the mean squared / absolute
difference; ``uniform`` gives every block the same importance (a uniform allocation).

Allocation (CFSP): s_l = sigmoid(a * (I_l - mean(I)) / 1e4); keep_l = s_l / mean(s) * (1 - ratio).
If max(s) / mean(s) * (1 - ratio) >= 1 the deviations from the mean are shrunk by
``mean * (1 / (1 - ratio) - 1) / (max - mean) / 1.05`` so every keep fraction stays below 1.

The 1e4 constant is not normalized by the number of calibration tokens: the same data summed over
twice the tokens gives a twice sharper allocation. ``normalize="per_token"`` divides I by the
token count and multiplies by :data:`REFERENCE_TOKENS` (128 windows x 1024 tokens), so it equals
the reference exactly at that token count and keeps the same sharpness at any other.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ..errors import LLMPruneError

Importance = Literal["angular", "cosine", "mse", "mae", "uniform"]
IMPORTANCE_METRICS: tuple[str, ...] = ("angular", "cosine", "mse", "mae", "uniform")
REFERENCE_TOKENS = 128 * 1024
SIGMOID_SCALE = 1e4


def block_importance(h_in: Tensor, h_out: Tensor, metric: Importance) -> float:
    """Importance contribution of one batch: summed over its tokens (float64 accumulation)."""
    x = h_in.reshape(-1, h_in.shape[-1]).double()
    y = h_out.reshape(-1, h_out.shape[-1]).double()
    if metric == "uniform":
        return float(x.shape[0])
    if metric in ("angular", "cosine"):
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).clamp(-1.0, 1.0)
        vals = torch.arccos(cos) / math.pi if metric == "angular" else 1.0 - cos
        return float(vals.sum())
    if metric == "mse":
        return float((x - y).pow(2).mean(dim=-1).sum())
    if metric == "mae":
        return float((x - y).abs().mean(dim=-1).sum())
    raise LLMPruneError(f"unknown block importance {metric!r}; use one of {', '.join(IMPORTANCE_METRICS)}")


def keep_fractions(importance: Tensor, ratio: float, a: float = 1.0, *, tokens: int | None = None,
                   normalize: Literal["reference", "per_token"] = "reference", double: bool = False) -> Tensor:
    """Per-block keep fractions whose mean is ``1 - ratio`` (CFSP's sigmoid allocation).

    importance: (L,) summed block importances; ``tokens`` is needed for ``normalize="per_token"``.
    float32 unless ``double`` (the released code's Python floats, for its budget rule).
    """
    if not 0.0 <= ratio < 1.0:
        raise LLMPruneError(f"pruning ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return torch.ones(importance.shape, dtype=torch.float64 if double else torch.float32)
    imp = importance.double()
    if normalize == "per_token":
        if not tokens:
            raise LLMPruneError("per-token normalized allocation needs the calibration token count")
        imp = imp / tokens * REFERENCE_TOKENS
    elif normalize != "reference":
        raise LLMPruneError(f"unknown allocation normalization {normalize!r}; use reference or per_token")
    s = torch.sigmoid(a * (imp - imp.mean()) / SIGMOID_SCALE)
    mean, top = s.mean(), s.max()
    keep_mean = 1.0 - ratio
    if top / mean * keep_mean >= 1.0 and top > mean:
        scale = mean * (1.0 / keep_mean - 1.0) / (top - mean) / 1.05
        s = mean + (s - mean) * scale
        mean = s.mean()
    keep = s / mean * keep_mean
    return keep if double else keep.float()


def channel_counts(keep: Tensor, width: int, round_to: int = 1) -> list[int]:
    """Channels kept per block from keep fractions: the total is exact (largest remainder) when
    ``round_to`` is 1; otherwise each count is rounded to the nearest multiple of ``round_to``
    (at least ``round_to``, at most ``width``)."""
    if round_to < 1:
        raise LLMPruneError(f"the rounding multiple must be >= 1, got {round_to}")
    if round_to > width:
        raise LLMPruneError(f"the rounding multiple {round_to} is larger than the MLP width {width}; "
                            f"choose a multiple <= {width}")
    raw = keep.double().clamp(0.0, 1.0) * width
    if round_to == 1:
        total = int(round(float(raw.sum())))
        counts = raw.floor().long()
        short = total - int(counts.sum())
        if short > 0:
            order = torch.argsort(raw - counts.double(), descending=True, stable=True)
            counts[order[:short]] += 1
        return [min(width, int(c)) for c in counts]
    return [int(min(width, max(round_to, round_to * round(float(r) / round_to)))) for r in raw]


def reference_channel_counts(keep: Tensor, width: int, round_to: int = 1) -> list[int]:
    """Channels kept per block as CFSP's released code keeps them (``budget="reference"``).

    It sorts a block's scores in descending order and keeps those ``>=`` the one at index
    ``int(width * keep)`` (``round_to`` 1): ``int(width * keep) + 1`` channels (capped at the width),
    not the exact total. With rounding (its ``cuda_friendly``, 128) the index is
    ``int((width * keep + round_to / 2) / round_to) * round_to - 1``, i.e. round half up to the
    multiple; where that is 0 the index is -1, the smallest score, and the block keeps *every*
    channel (a bug of the released code, reproduced here only under this option). Keep fractions
    are taken in float64 here and in the reference's Python floats alike."""
    out = []
    for k in keep.double().tolist():
        raw = width * k
        if round_to == 1:
            out.append(min(width, int(raw) + 1))
        else:
            kept = int((raw + round_to / 2) / round_to) * round_to
            out.append(width if kept == 0 else min(width, kept))
    return out
