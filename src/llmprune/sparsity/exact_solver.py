"""Exact layer-wise reconstruction for a fixed sparsity mask: one least-squares solve per output row.

For a linear with dense weights W0 (rows, cols), input Hessian H = X^T X and a fixed mask (True =
pruned), each row's kept weights w_K minimize the row's calibration output error

    || X (w - w0) ||^2  subject to  w_P = 0,

whose solution is  w_K = (H_KK)^-1 (H w0)_K : one (k x k) system per row, k = the row's kept count.
SparseGPT's column-by-column OBS updates (:mod:`.obs_solver`) solve the same problem only
approximately: once a column is passed its kept weights are frozen, so they never compensate for
weights pruned to their right (the price SparseGPT pays for sharing one H^-1 between rows with
different masks). The exact solve therefore never has a larger calibration error for the same mask
(up to rounding; tested), at a cost of O(rows * k^3) instead of O(cols^3 + rows * cols^2): about
two minutes over all of SmolLM2's linears at 2:4 on two CPU cores, and for a 7B model a job for a GPU.

Dampening follows SparseGPT's reference (``damp`` times the mean of H's diagonal on every
diagonal entry; an input that is always zero gets diagonal 1 first), so with the same ``damp``
both solvers minimize the same damped objective; a row whose system is still not positive
definite in float32 is retried with 10x more dampening, as :func:`.obs_solver.inverse_hessian_factor`
does for the whole matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .obs_solver import dampening

# Bytes of gathered (k x k) systems solved at once: bounds the solver's extra memory.
CHUNK_BYTES = 16 * 2**20


def damped_hessian(hessian: Tensor, damp: float) -> tuple[Tensor, float]:
    """float32 H + lambda * I with SparseGPT's dampening (:func:`.obs_solver.dampening`), and lambda."""
    h, lam = dampening(hessian, damp)
    torch.diagonal(h).add_(lam)
    return h, float(lam)


def masked_least_squares(weight: Tensor, hessian: Tensor, mask: Tensor, *, damp: float = 0.01,
                         chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """Kept weights of ``weight`` (rows, cols) re-solved exactly for ``mask`` (bool, True = pruned).

    ``hessian``: the (cols, cols) input Hessian. Returns a float32 tensor of the weight's shape, zero
    exactly where the mask is True. Rows are grouped by their kept count and solved in chunks of
    at most ``chunk_bytes`` of gathered systems."""
    rows, cols = weight.shape
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool of the weight's shape {tuple(weight.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if hessian.shape != (cols, cols):
        raise ValueError(f"the Hessian must be ({cols}, {cols}), got {tuple(hessian.shape)}")
    device = weight.device
    h, lam = damped_hessian(hessian.to(device), damp)
    if lam == 0:  # retries add 10x more each time: start from 1e-6 of the mean diagonal without dampening
        lam = 1e-6 * float(torch.mean(torch.diagonal(h)))
    w0 = weight.detach().float()
    rhs = w0 @ h  # (rows, cols): row i is (H w0_i)^T, H symmetric
    keep = ~mask.to(device)
    out = torch.zeros(rows, cols, dtype=torch.float32, device=device)
    counts = keep.sum(dim=1)
    for k in torch.unique(counts).tolist():
        if k == 0:
            continue
        group = torch.nonzero(counts == k).flatten()
        step = max(1, chunk_bytes // (4 * k * k))
        for start in range(0, group.numel(), step):
            sel = group[start:start + step]
            # kept column indices of each row, ascending (stable sort puts True first)
            idx = torch.sort((~keep[sel]).to(torch.uint8), dim=1, stable=True).indices[:, :k]
            out[sel.unsqueeze(1), idx] = _solve_rows(h, idx, rhs[sel].gather(1, idx), lam)
    return out


def _solve_rows(h: Tensor, idx: Tensor, b: Tensor, lam: float) -> Tensor:
    """Solve H[idx_r, idx_r] x_r = b_r for every row r (batched Cholesky); rows whose system is not
    positive definite in float32 get 10x more dampening, up to 10^6x.

    Not batched LU (``torch.linalg.solve_ex``): with PyTorch 2.13's CPU build, once anything has
    called ``torch.set_num_threads`` (SparseGPT's column loop does), MKL's batched LU solve fails
    ("Parameter 6 was incorrect on entry to SLASWP") and slows to a crawl; Cholesky is unaffected
    and as fast for these systems (tested in a fresh process)."""
    systems = h[idx.unsqueeze(2), idx.unsqueeze(1)]  # (r, k, k)
    chol, info = torch.linalg.cholesky_ex(systems)
    failed = torch.nonzero(info).flatten()
    extra = lam
    for _ in range(6):
        if failed.numel() == 0:
            break
        extra *= 10
        eye = torch.eye(systems.shape[1], dtype=systems.dtype, device=systems.device)
        fixed, info_retry = torch.linalg.cholesky_ex(systems[failed] + extra * eye)
        chol[failed] = fixed
        failed = failed[info_retry != 0]
    if failed.numel():
        raise torch.linalg.LinAlgError("a row's kept-weight Hessian is not positive definite even after 10^6x dampening")
    return torch.cholesky_solve(b.unsqueeze(2), chol).squeeze(2)
