"""Channel scores for structured MLP pruning: higher = more important = kept.

Every function takes the weights of one MLP as plain tensors and the statistics of the MLP
output linear's input X (the gated activation), and returns a (width,) float32 score.

* ``cfsp_faithful``: CFSP's fine score as the released code computes it. Each term is normalized
  by its sum over the hidden index i and then averaged over the same i, so every weight term is
  1 / hidden and the ranking is by ||X_j|| alone (kept because it is what the paper's numbers used).
* ``cfsp_weight_aware``: the same formula normalized along the other axis (over channels j, per
  hidden unit i), as the paper's equation reads: a channel scores high when its weights are large
  relative to the other channels feeding/reading the same hidden unit.
* ``wanda_sp``: mean_i |W_out_ij| * ||X_j|| (Wanda-SP, An et al. 2024).
* ``magnitude_sp``: ||W_out[:, j]||_2, the output column norm.
* ``flap``: Var(X_j) * ||W_out[:, j]||^2 (FLAP's fluctuation metric); standardized per layer and
  thresholded globally by the method.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

_EPS = 1e-12


def _norm(x_sq_norm: Tensor) -> Tensor:
    return x_sq_norm.float().clamp_min(0).sqrt()


def _cfsp(w_out: Tensor, w_ins: Sequence[Tensor], x_sq_norm: Tensor, b: float, c: float, faithful: bool) -> Tensor:
    """w_out: (hidden, width); w_ins: each (width, hidden); x_sq_norm: (width,)."""
    xn = _norm(x_sq_norm)
    down = w_out.float().abs() * xn.pow(b).unsqueeze(0)  # (hidden, width)
    # faithful: normalize over hidden i (dim 0 of down, dim 1 of ins); weight-aware: over channels j.
    total = down / down.sum(dim=0 if faithful else 1, keepdim=True).clamp_min(_EPS)
    terms = total.t()  # (width, hidden)
    for w in w_ins:
        a = w.float().abs()
        terms = terms + a / a.sum(dim=1 if faithful else 0, keepdim=True).clamp_min(_EPS)
    return terms.mean(dim=1) * xn.pow(c)


def cfsp_faithful(w_out: Tensor, w_ins: Sequence[Tensor], x_sq_norm: Tensor, b: float = 1.0, c: float = 1.0) -> Tensor:
    return _cfsp(w_out, w_ins, x_sq_norm, b, c, faithful=True)


def cfsp_weight_aware(w_out: Tensor, w_ins: Sequence[Tensor], x_sq_norm: Tensor, b: float = 1.0,
                      c: float = 1.0) -> Tensor:
    return _cfsp(w_out, w_ins, x_sq_norm, b, c, faithful=False)


def wanda_sp(w_out: Tensor, x_sq_norm: Tensor) -> Tensor:
    return (w_out.float().abs() * _norm(x_sq_norm).unsqueeze(0)).mean(dim=0)


def magnitude_sp(w_out: Tensor) -> Tensor:
    return w_out.float().norm(dim=0)


def flap(w_out: Tensor, x_variance: Tensor) -> Tensor:
    return x_variance.float() * w_out.float().pow(2).sum(dim=0)


def standardize(scores: Tensor) -> Tensor:
    """(s - mean) / std within one layer (FLAP's per-layer standardization before a global threshold)."""
    s = scores.double()
    std = s.std()
    return ((s - s.mean()) / (std if std > 0 else 1.0)).float()
