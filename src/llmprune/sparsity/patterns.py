"""Sparsity patterns as values.

``Pattern`` says *how many* weights to prune and *within which groups* the count is exact:

* unstructured, ``scope="row"``: each output row loses exactly ``floor(in_features * sparsity)``;
* unstructured, ``scope="matrix"``: the whole matrix loses exactly ``floor(numel * sparsity)``;
* N:M: in every group of M consecutive input weights of a row, exactly N are kept (M - N pruned).
  This is NVIDIA's convention (2:4 keeps 2 of 4); sparsity is then ``1 - N/M``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import LLMPruneError

Scope = Literal["row", "matrix"]


@dataclass(frozen=True)
class Pattern:
    sparsity: float
    n: int | None = None
    m: int | None = None
    scope: Scope = "row"

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def prune_per_group(self) -> int:
        """Weights pruned in each M-group (N:M only)."""
        assert self.n is not None and self.m is not None
        return self.m - self.n

    def __str__(self) -> str:
        if self.is_nm:
            return f"{self.n}:{self.m}"
        return f"unstructured({self.sparsity:g}, {self.scope})"

    def check_width(self, in_features: int, where: str) -> None:
        """Raise if an N:M pattern does not tile a layer of this input width."""
        if self.m is not None and in_features % self.m != 0:
            raise LLMPruneError(
                f"pattern {self.n}:{self.m} does not divide the input width {in_features} of {where}; "
                f"choose an M that divides every layer's input width"
            )


def parse_pattern(pattern: str | None, sparsity: float | None, scope: Scope = "row") -> Pattern:
    """Build a Pattern from CLI/recipe values, checking them before any work is done."""
    if pattern in (None, "", "unstructured"):
        if sparsity is None:
            raise LLMPruneError("give --sparsity (a fraction in [0, 1)) or an N:M --pattern such as 2:4")
        _check_sparsity(sparsity)
        if scope not in ("row", "matrix"):
            raise LLMPruneError(f"unknown sparsity scope {scope!r}; use 'row' or 'matrix'")
        return Pattern(float(sparsity), scope=scope)
    parts = str(pattern).split(":")
    if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
        raise LLMPruneError(f"cannot read pattern {pattern!r}; write N:M such as 2:4, or 'unstructured'")
    n, m = (int(p) for p in parts)
    if not 0 < n < m:
        raise LLMPruneError(f"pattern {pattern!r} needs 0 < N < M (N weights kept of every M)")
    implied = 1.0 - n / m
    if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
        raise LLMPruneError(
            f"--sparsity {sparsity} contradicts --pattern {pattern} (which prunes {implied:g}); "
            f"leave --sparsity out or set it to {implied:g}"
        )
    return Pattern(implied, n=n, m=m, scope="row")


def _check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or sparsity != sparsity or not 0.0 <= float(sparsity) < 1.0:
        raise LLMPruneError(f"sparsity must be a fraction in [0, 1), got {sparsity!r}")
