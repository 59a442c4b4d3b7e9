"""Running input statistics of a linear layer, accumulated in float32.

``update`` takes the layer input of any shape (..., in_features). ``sq_norm`` is the per-column
sum of squares (Wanda's ||X_j||^2); ``hessian`` is X^T X (SparseGPT's H, up to a constant factor
that cancels: dampening is relative to the mean diagonal); ``mean`` and ``variance`` are per-column
moments over calibration tokens (FLAP's fluctuation and bias compensation).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..sparsity.bits import all_finite

STATS_DTYPE = torch.float32
_CHUNK_ELEMENTS = 1 << 22  # rows of an input converted to float32 at a time: 16 MB


class InputStats:
    def __init__(self, in_features: int, *, hessian: bool, device: torch.device, moments: bool = True) -> None:
        """``moments=False`` skips the per-column sums behind ``mean`` and ``variance`` (a float64
        reduction that is about half the cost of an update; the unstructured methods never read them)."""
        self.in_features = in_features
        self.tokens = 0
        self._sq_norm = torch.zeros(in_features, dtype=STATS_DTYPE, device=device)
        self._sum = torch.zeros(in_features, dtype=torch.float64, device=device) if moments else None
        self.hessian: Tensor | None = (
            torch.zeros(in_features, in_features, dtype=STATS_DTYPE, device=device) if hessian else None
        )
        self.nonfinite = False
        # FLAP's fluctuation as the released add_batch computes it, one sample at a time
        # (``fluctuation``); None once merged from several devices (the running order is lost).
        self._flap: list[Any] | None = [0, torch.zeros(in_features, dtype=STATS_DTYPE, device=device),
                                        torch.zeros(in_features, dtype=STATS_DTYPE, device=device)] if moments else None

    @property
    def sq_norm(self) -> Tensor:
        """(in_features,) sum over calibration tokens of x_j^2."""
        return torch.diagonal(self.hessian).clone() if self.hessian is not None else self._sq_norm

    @property
    def mean(self) -> Tensor:
        """(in_features,) mean of x_j over calibration tokens."""
        if self._sum is None:
            raise RuntimeError("these statistics were gathered without moments (InputStats(moments=False))")
        return (self._sum / max(self.tokens, 1)).to(STATS_DTYPE)

    @property
    def variance(self) -> Tensor:
        """(in_features,) unbiased variance of x_j over calibration tokens."""
        if self._sum is None:
            raise RuntimeError("these statistics were gathered without moments (InputStats(moments=False))")
        n = self.tokens
        if n < 2:
            return torch.zeros_like(self._sq_norm)
        sq = self.sq_norm.double()
        return ((sq - self._sum.pow(2) / n) / (n - 1)).clamp_min(0.0).to(STATS_DTYPE)

    @property
    def fluctuation(self) -> Tensor:
        """(in_features,) FLAP's fluctuation as its released ``add_batch`` computes it: a running mean
        updated in place, which the update reads as the *old* mean too (the two are one tensor), so
        after N samples it is (1/(N-1)) sum over samples k>=2 of (k-1)/k * sum_t (x_kt - m_k)^2, m_k
        the running mean after sample k: the first sample's deviations never count."""
        if self._flap is None:
            raise RuntimeError("the reference fluctuation needs moments gathered on one device, sample by sample")
        return self._flap[2].clone()

    def _flap_sample(self, x: Tensor) -> None:
        """One sample's tokens (tokens, in_features) into the reference's running fluctuation."""
        assert self._flap is not None
        n, mean, fluc = self._flap
        x = x.to(STATS_DTYPE)
        mean.mul_(n / (n + 1)).add_(x.mean(dim=0) / (n + 1))
        if n == 0:
            fluc.zero_()
        else:
            fluc.mul_((n - 1) / n).add_((x - mean).pow(2).sum(dim=0) / (n + 1))
        self._flap[0] = n + 1

    def update(self, x: Tensor) -> None:
        """Add the tokens of ``x`` (..., in_features), a few rows at a time.

        Each chunk's float32 copy and its squares are small temporaries (about 16 MB), instead of two
        float32 copies of the whole input: for the MLP down projection of a 7B layer with 8 x 512
        tokens those were 2 x 180 MB, allocated and freed for every linear of every layer.
        """
        samples = x.detach().reshape(-1, x.shape[-2] if x.dim() > 2 else x.shape[0], self.in_features)
        x = x.detach().reshape(-1, self.in_features)
        if not all_finite(x):
            self.nonfinite = True
            return
        if self._flap is not None:
            for sample in samples:
                self._flap_sample(sample)
        self.tokens += x.shape[0]
        for chunk in x.split(max(1, _CHUNK_ELEMENTS // self.in_features)):
            chunk = chunk.to(STATS_DTYPE)
            if self._sum is not None:
                self._sum.add_(chunk.sum(dim=0, dtype=torch.float64))
            if self.hessian is not None:
                self.hessian.addmm_(chunk.t(), chunk)
            else:
                self._sq_norm.add_(chunk.pow(2).sum(dim=0))

    def as_identity_(self) -> None:
        """Make these statistics uninformative: every column's ||X_j||^2 is 1 and X^T X is the identity,
        so Wanda and SparseGPT rank weights by |W| alone (SparseGPT makes no update). The stated
        fallback for an MoE expert the router sent no calibration token to (``tokens`` stays 0)."""
        self._sq_norm.fill_(1.0)
        if self.hessian is not None:
            self.hessian = torch.eye(self.in_features, dtype=STATS_DTYPE, device=self.hessian.device)

    def merge_(self, other: InputStats) -> None:
        """Add ``other``'s tokens (statistics of the same linear on other calibration batches, e.g. from
        another device of a multi-device run) into these, in place."""
        if other.in_features != self.in_features or (other.hessian is None) != (self.hessian is None) or (
                other._sum is None) != (self._sum is None):
            raise ValueError("merged statistics must be of the same linear and kind")
        self.tokens += other.tokens
        self._flap = None
        self.nonfinite = self.nonfinite or other.nonfinite
        dev = self._sq_norm.device
        self._sq_norm.add_(other._sq_norm.to(dev))
        if self._sum is not None and other._sum is not None:
            self._sum.add_(other._sum.to(dev))
        if self.hessian is not None and other.hessian is not None:
            self.hessian.add_(other.hessian.to(dev))
