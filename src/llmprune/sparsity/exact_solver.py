"""Exact layer-wise reconstruction for a fixed sparsity mask: one least-squares problem per output row.

For a linear with dense weights W0 (rows, cols), input Hessian H = X^T X and a fixed mask (True =
pruned), each row's kept weights w_K minimize the row's calibration output error

    || X (w - w0) ||^2  subject to  w_P = 0,

whose solution is  w_K = (H_KK)^-1 (H w0)_K : one (k x k) system per row, k = the row's kept count.
SparseGPT's column-by-column OBS updates (:mod:`.obs_solver`) solve the same problem only
approximately: once a column is passed its kept weights are frozen, so they never compensate for
weights pruned to their right (the price SparseGPT pays for sharing one H^-1 between rows with
different masks). The exact solution therefore never has a larger calibration error for the same
mask (up to rounding; tested).

Two ways to reach it (``method``):

* ``"cg"`` (the default): preconditioned conjugate gradients on every row at once, started from
  SparseGPT's OBS solution for the mask and preconditioned with (H^-1)_KK, the kept block of the
  inverse that SparseGPT already factors. Every step is two dense (rows x cols) @ (cols x cols)
  products with the masked iterate, so the rows' different kept sets cost nothing extra, and the
  damped objective falls at every step (CG minimizes the error in the system's own norm), so the
  result is never worse than SparseGPT's even if stopped early. It stops once a step lowers the
  objective by less than ``tol`` of its value on two steps running. Measured on the Hessians of five
  SmolLM2 layers (C4, 8 x 2048 tokens; 2:4 and 50% masks, 40 solves): its objective is within 1e-8
  to 3e-6 of the OBS-to-exact gap of the float32 Cholesky solve's (on one matrix below it: the
  Cholesky is the less accurate there), in 9.6 s against 43.3 s on two CPU cores; its memory is a
  few copies of the weight instead of k x k systems.
* ``"cholesky"``: the systems gathered and solved by batched Cholesky, rows grouped by kept count and
  chunked; O(rows * k^3). Also the fallback of ``"cg"`` when the damped H itself is not positive
  definite in float32, or when the iteration has not converged after ``max_iter`` steps and the
  direct solve is cheap enough (:data:`DIRECT_FALLBACK_FLOPS`: every SmolLM2-sized linear; beyond
  it the iterate, already better than the OBS start, is kept with a warning).

Cost at 7B widths (``benchmarks/exact_solver_cost.py``, recorded in
``benchmarks/results/exact_solver/exact_solver_cost.json``; synthetic Hessians of 2 x cols tokens,
50% per-row masks, on two CPU cores that other jobs shared, so upper bounds of an unshared
machine): 4096 x 4096 took about 350 s (16 CG steps, 75% of it; the factorizations of H and H^-1
most of the rest) and 11008 x 4096 about 710 s (three row chunks, 48 steps in all, 91%). A CG
step is two (rows x cols) @ (cols x cols) products, 2.7e11 flops for 4096 x 4096, so the cost is
``factorization + OBS start + steps x 4 rows cols^2`` flops: bounded by ``max_iter`` steps (the
direct fallback is not taken at these widths). Real Hessians can need more steps than these
synthetic ones. What was sped up without changing any result (bit for bit, checked against the
previous code): one product fewer before the first step (the objective's e H and the
residual share it), and a caller that already has the OBS solution (SparseGPT's own, its
``reconstruct_solver=exact``) passes it as ``start`` instead of recomputing it. Running the steps on
one thread is 3-10x faster on small matrices when the cores are shared, but changes the last bits
of the result, so it is not done.

Dampening follows SparseGPT's reference (``damp`` times the mean of H's diagonal on every
diagonal entry; an input that is always zero gets diagonal 1 first), so with the same ``damp``
both solvers minimize the same damped objective; in the direct solve, a row whose system is still
not positive definite in float32 is retried with 10x more dampening, as
:func:`.obs_solver.inverse_hessian_factor` does for the whole matrix.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import torch
from torch import Tensor

from .obs_solver import dampening, inverse_and_factor, sparsegpt_prune
from .patterns import Pattern

log = logging.getLogger(__name__)

# Bytes of gathered (k x k) systems solved at once by the direct solve: bounds its extra memory.
CHUNK_BYTES = 16 * 2**20
# Bytes of one (rows x cols) float32 iterate of the conjugate gradients: rows beyond it are solved
# in further chunks (rows are independent), so a 7B model's largest linear needs a few such copies.
CG_CHUNK_BYTES = 64 * 2**20
# Where the conjugate gradients have not converged after ``max_iter`` steps, the direct solve takes
# over only while it costs at most about this many flops (sum over rows of k^3 / 3, k = the row's kept
# count): every SmolLM2 linear (at most 9e10) stays under it, as before the bound; a 7B model's
# 4096 x 4096 at 50% (1.2e13, hours on two cores) does not, and keeps the iterate, so one solve costs
# at most ``max_iter`` steps.
DIRECT_FALLBACK_FLOPS = 1e12


def damped_hessian(hessian: Tensor, damp: float) -> tuple[Tensor, float]:
    """float32 H + lambda * I with SparseGPT's dampening (:func:`.obs_solver.dampening`), and lambda."""
    h, lam = dampening(hessian, damp)
    torch.diagonal(h).add_(lam)
    return h, float(lam)


def masked_least_squares(weight: Tensor, hessian: Tensor, mask: Tensor, *, damp: float = 0.01,
                         method: Literal["cg", "cholesky"] = "cg", tol: float = 1e-6, max_iter: int = 200,
                         chunk_bytes: int = CHUNK_BYTES, start: Tensor | None = None,
                         info: dict[str, float] | None = None) -> Tensor:
    """Kept weights of ``weight`` (rows, cols) re-solved exactly for ``mask`` (bool, True = pruned).

    ``hessian``: the (cols, cols) input Hessian. Returns a float32 tensor of the weight's shape, zero
    exactly where the mask is True. ``method``, ``tol``, ``max_iter``: see the module docstring;
    ``chunk_bytes``: the direct solve's chunk of gathered systems. ``start``: SparseGPT's OBS solution
    for this mask and ``damp`` when the caller has it (the conjugate gradients' starting point,
    otherwise computed here); it must be zero where the mask is True. ``info``: a dict that receives
    where the time went (``factor_s``, ``start_s``, ``cg_s``, ``steps``: conjugate-gradient steps
    summed over row chunks), for profiling."""
    rows, cols = weight.shape
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool of the weight's shape {tuple(weight.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if hessian.shape != (cols, cols):
        raise ValueError(f"the Hessian must be ({cols}, {cols}), got {tuple(hessian.shape)}")
    if start is not None and start.shape != weight.shape:
        raise ValueError(f"start must be of the weight's shape {tuple(weight.shape)}, got {tuple(start.shape)}")
    if method not in ("cg", "cholesky"):
        raise ValueError(f"method must be 'cg' or 'cholesky', got {method!r}")
    device = weight.device
    h, lam = damped_hessian(hessian.to(device), damp)
    w0 = weight.detach().float()
    mask = mask.to(device)
    keep = ~mask
    if method == "cholesky":
        return _direct(w0, h, keep, lam, chunk_bytes)
    clock = time.perf_counter()
    found = inverse_and_factor(h)  # H, H^-1 and the factor of H^-1: the (cols x cols) tensors kept
    _add(info, "factor_s", clock)
    if found is None:
        log.info("the damped Hessian is not positive definite in float32; solving row by row directly")
        return _direct(w0, h, keep, lam, chunk_bytes)
    h_inv, factor = found
    out = torch.empty(rows, cols, dtype=torch.float32, device=device)
    step = max(1, CG_CHUNK_BYTES // (4 * cols))
    for first in range(0, rows, step):
        part = slice(first, first + step)
        clock = time.perf_counter()
        if start is not None:
            x0 = start[part].to(device=device, dtype=torch.float32, copy=True).masked_fill_(mask[part], 0.0)
        else:
            x0, _ = sparsegpt_prune(w0[part], hessian, Pattern(0.0), damp=damp, mask=mask[part], factor=factor)
        clock = _add(info, "start_s", clock)
        solved, converged = _conjugate_gradients(x0, w0[part], h, h_inv, keep[part], tol, max_iter, info)
        _add(info, "cg_s", clock)
        if not converged:
            kept = keep[part].sum(dim=1).double()
            if float(kept.pow(3).sum()) / 3 <= DIRECT_FALLBACK_FLOPS:
                log.info("conjugate gradients did not converge in %d steps; solving %d rows directly", max_iter,
                         x0.shape[0])
                solved = _direct(w0[part], h, keep[part], lam, chunk_bytes)
            else:  # the direct solve would cost far more than the steps taken: keep the lowered iterate
                log.warning("conjugate gradients did not converge in %d steps on %d rows of width %d; keeping their "
                            "iterate (a lower calibration error than the OBS start, not the exact optimum)", max_iter,
                            x0.shape[0], cols)
        out[part] = solved
    return out


def _add(info: dict[str, float] | None, key: str, since: float) -> float:
    """Add the seconds since ``since`` to ``info[key]`` (when profiling); returns the time now."""
    now = time.perf_counter()
    if info is not None:
        info[key] = info.get(key, 0.0) + now - since
    return now


def _conjugate_gradients(x: Tensor, w0: Tensor, h: Tensor, h_inv: Tensor, keep: Tensor, tol: float,
                         max_iter: int, info: dict[str, float] | None = None) -> tuple[Tensor, bool]:
    """Every row's H_KK x_K = (H w0)_K by CG from ``x`` (zero where pruned), preconditioned by
    (H^-1)_KK; returns the iterate and whether it converged (False: a step still lowered the
    objective by ``tol`` of it after ``max_iter`` steps; the iterate is then still better than ``x``).

    With e = x - w0 the objective is sum over rows of e H e^T, and a step of length alpha along p
    lowers it by exactly alpha * (r . z) (r = the residual, z = the preconditioned residual), so the
    stopping test needs no extra product."""
    kf = keep.to(x.dtype)
    err = x - w0
    eh = err @ h  # one product for both: the objective's e H and, negated (exactly), the residual's H (w0 - x)
    objective = float((eh * err).sum())
    del err
    residual = eh.neg_().mul_(kf)  # (H w0 - H x)_K; zero where pruned
    z = residual @ h_inv * kf
    p = z.clone()
    rz = (residual * z).sum(dim=1, keepdim=True)
    small = 0
    for _ in range(max_iter):
        if objective <= 0:
            return x, True
        hp = p @ h * kf
        if info is not None:
            info["steps"] = info.get("steps", 0) + 1
        php = (p * hp).sum(dim=1, keepdim=True)
        alpha = torch.where(php > 0, rz / php.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(php))
        lowered = float((alpha * rz).sum())
        x.add_(alpha * p)
        residual.sub_(alpha * hp)
        objective -= lowered
        small = small + 1 if lowered <= tol * objective else 0
        if small == 2:
            return x, True
        z = residual @ h_inv * kf
        rz_next = (residual * z).sum(dim=1, keepdim=True)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_next
    return x, False


def _direct(w0: Tensor, h: Tensor, keep: Tensor, lam: float, chunk_bytes: int) -> Tensor:
    """The direct solve: rows grouped by kept count, gathered systems in chunks of ``chunk_bytes``."""
    rows, cols = w0.shape
    if lam == 0:  # retries add 10x more each time: start from 1e-6 of the mean diagonal without dampening
        lam = 1e-6 * float(torch.mean(torch.diagonal(h)))
    rhs = w0 @ h  # (rows, cols): row i is (H w0_i)^T, H symmetric
    out = torch.zeros(rows, cols, dtype=torch.float32, device=w0.device)
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
