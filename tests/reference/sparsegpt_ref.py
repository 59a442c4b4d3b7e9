"""A slow, obviously correct SparseGPT (OBS) reference, written independently of ``obs_solver.py``.

Float64 NumPy, one column at a time, with the explicit inverse Hessian of the columns not yet
eliminated (no Cholesky, no blocking, no lazy updates). For the remaining columns ``j..n-1`` let
``Hinv = (H[j:, j:])^-1``. Eliminating column j (fixing it to ``q_j``: 0 if pruned, else kept) is the
OBS step

    w[:, j+1:] -= (w_j - q_j) / Hinv[0, 0] * Hinv[0, 1:]
    Hinv       <- Hinv[1:, 1:] - Hinv[1:, :1] Hinv[:1, 1:] / Hinv[0, 0]     (Schur complement)

Mask rule (Frantar & Alistarh 2023, adaptive mask selection), as in the solver: the saliency of
column k is ``w_k^2 / d_k`` with ``d_k = Hinv_kk`` taken *at the step where k is eliminated*, i.e.
``d_k = [(H[k:, k:])^-1]_00``. This equals [U_kk]^2 for U the upper Cholesky factor of H^-1, so it is
the paper's ``w^2 / [H^-1]_kk^2`` read with the Cholesky factor. Each ``d_k`` is computed here by
inverting the trailing submatrix outright.

* unstructured: at the start of every block of ``block_size`` columns, from the current weights;
  the count pruned in the block is the cumulative ``floor(s * end) - floor(s * start)`` (per row for
  scope "row", with ``s * rows`` in place of ``s`` for scope "matrix");
* N:M: at every column ``j`` with ``j % m == 0``, the ``m - n`` lowest of columns ``j..j+m-1``.

Ties go to the lower index (stable sort).
"""

from __future__ import annotations

import math

import numpy as np


def damped_hessian(hessian: np.ndarray, damp: float) -> np.ndarray:
    """H with dead (zero-diagonal) columns given diagonal 1, plus damp * mean(diag) on the diagonal."""
    h = np.array(hessian, dtype=np.float64, copy=True)
    n = h.shape[0]
    for j in range(n):
        if h[j, j] == 0.0:
            h[j, j] = 1.0
    lam = damp * float(np.mean(np.diag(h)))
    for j in range(n):
        h[j, j] += lam
    return h


def elimination_diagonal(h: np.ndarray) -> np.ndarray:
    """d_k = [(H[k:, k:])^-1]_00 for every k: the OBS denominator when column k is eliminated."""
    n = h.shape[0]
    return np.array([np.linalg.inv(h[k:, k:])[0, 0] for k in range(n)])


def _lowest(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` smallest entries of a 1-D array, ties to the lower index."""
    return np.argsort(values, kind="stable")[:count]


def sparsegpt_reference(
    weight: np.ndarray,
    hessian: np.ndarray,
    *,
    sparsity: float = 0.0,
    n: int | None = None,
    m: int | None = None,
    scope: str = "row",
    block_size: int = 128,
    damp: float = 0.01,
    fixed_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (new_weight float64, prune_mask bool). weight: (rows, cols); hessian: (cols, cols).

    ``fixed_mask`` (bool, True = prune): no selection; the columns are eliminated with that mask."""
    w = np.array(weight, dtype=np.float64, copy=True)
    rows, cols = w.shape
    h = damped_hessian(hessian, damp)
    d = elimination_diagonal(h)
    hinv = np.linalg.inv(h)  # inverse over the columns not yet eliminated (all of them, now)
    mask = np.zeros((rows, cols), dtype=bool) if fixed_mask is None else np.array(fixed_mask, dtype=bool)
    if fixed_mask is not None:
        sparsity, m = 0.0, None

    for j in range(cols):
        if m is None and j % block_size == 0 and sparsity > 0:
            start, end = j, min(j + block_size, cols)
            saliency = w[:, start:end] ** 2 / d[start:end]
            if scope == "row":
                count = math.floor(sparsity * end) - math.floor(sparsity * start)
                for r in range(rows):
                    mask[r, start + _lowest(saliency[r], count)] = True
            else:
                count = math.floor(sparsity * rows * end) - math.floor(sparsity * rows * start)
                for flat in _lowest(saliency.reshape(-1), count):
                    r, c = divmod(int(flat), end - start)
                    mask[r, start + c] = True
        if m is not None and j % m == 0:
            assert n is not None
            saliency = w[:, j : j + m] ** 2 / d[j : j + m]
            for r in range(rows):
                mask[r, j + _lowest(saliency[r], m - n)] = True

        assert np.isclose(hinv[0, 0], d[j], rtol=1e-8), "iterated Hinv disagrees with the explicit inverse"
        q = np.where(mask[:, j], 0.0, w[:, j])
        delta = w[:, j] - q  # (rows,)
        w[:, j + 1 :] -= np.outer(delta / hinv[0, 0], hinv[0, 1:])
        w[:, j] = q
        hinv = hinv[1:, 1:] - np.outer(hinv[1:, 0], hinv[0, 1:]) / hinv[0, 0]

    return w, mask
