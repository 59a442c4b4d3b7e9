"""SparseGPT: blocked OBS pruning with weight reconstruction (Frantar & Alistarh 2023, Alg. 1).

Follows the reference implementation (``sparsegpt.py``, ``SparseGPT.fasterprune``): dampening of
``damp`` times the mean Hessian diagonal, the upper Cholesky factor of H^-1, column blocks of
``block_size``, mask chosen per block by w^2 / [H^-1]_jj^2 (adaptive mask selection), and lazy
batched error propagation to the columns right of the block.

Two differences, both so that the promised sparsity is exact rather than approximate (each can be
switched to the reference's form, ``count="reference"`` and ``zero_dead=True``: SparseGPT's
``faithful`` option):

* The count pruned in each block is taken from the cumulative target (``floor(s * end) -
  floor(s * start)``), so the whole matrix (``scope="matrix"``, the reference's behaviour) or
  each row (``scope="row"``) loses exactly ``floor(s * size)`` weights. The reference takes
  ``thresh = sorted(saliency)[int(numel * s)]`` over the block and prunes ``saliency <= thresh``,
  i.e. ``int(numel * s) + 1`` weights in every block (more only on ties), so a matrix ends up
  above its target by about one weight per 128-column block.
* Columns whose input is always zero ("dead") are not zeroed outright: the reference zeroes them,
  which silently raises sparsity above the target. Their weights never affect the calibration
  output, and they take part in selection like any other column.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from .patterns import Pattern


@contextmanager
def _single_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Run a loop of small ops on one CPU thread.

    The per-column OBS updates are (rows x <=block) tensors: intra-op threads only add barrier
    waits, which turn into 20-50x slowdowns when the cores are shared (measured on 2 cores).
    The large lazy update between blocks keeps every thread.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def dampening(hessian: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """The reference's dampening, shared with :mod:`.exact_solver`: a float32 copy of H whose dead
    inputs (always zero) get diagonal 1, and lambda = ``damp`` * the mean of that diagonal (not yet
    added: callers retry with 10x more)."""
    h = hessian.float().clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    return h, damp * torch.mean(diag)


def inverse_and_factor(damped: Tensor) -> tuple[Tensor, Tensor] | None:
    """(H^-1, the upper Cholesky factor of H^-1) of an already damped float32 H, or None where either
    factorization finds it not positive definite. Shared with :mod:`.exact_solver`."""
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        return None
    h_inv = torch.cholesky_inverse(chol)
    del chol
    factor, info = torch.linalg.cholesky_ex(h_inv, upper=True)
    return (h_inv, factor) if int(info) == 0 else None


def inverse_hessian_factor(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, float32. hessian: (cols, cols)."""
    h, lam = dampening(hessian, damp)
    idx = torch.arange(h.shape[0], device=h.device)
    for attempt in range(6):
        damped = h.clone()
        damped[idx, idx] += lam * (10**attempt)
        found = inverse_and_factor(damped)
        if found is not None:
            return found[1]
    raise torch.linalg.LinAlgError("Hessian is not positive definite even after 10^5x dampening")


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    pattern: Pattern,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    mask: Tensor | None = None,
    factor: Tensor | None = None,
    overwrite: bool = False,
    count: str = "exact",
    zero_dead: bool = False,
) -> tuple[Tensor, Tensor]:
    """Prune ``weight`` (out, in) given the input Hessian (in, in).

    ``factor``: :func:`inverse_hessian_factor` of ``hessian`` with this ``damp``, when the caller
    already has it (linears with the same input share it); computed here otherwise. ``overwrite``:
    a float32 ``weight`` may be worked on in place (no float32 copy of it is made).

    ``mask`` (bool, the weight's shape, True = prune) fixes the pruned weights instead of choosing
    them: the weights are then only reconstructed, by the same column-by-column OBS updates, for that
    mask (``pattern`` is not consulted). LLM-Barber's ``reconstruct`` option uses this for its
    rebuilt masks.

    ``count="reference"`` prunes ``saliency <= sorted(saliency)[int(numel * s)]`` per block (unstructured
    only) and ``zero_dead`` zeroes the columns of always-zero inputs first, as the released code does.

    Returns (new_weight float32, prune_mask bool); new_weight is zero exactly where the mask is True.
    """
    if count not in ("exact", "reference"):
        raise ValueError(f"count must be exact or reference, got {count!r}")
    w = weight.detach()
    # contiguous: a transposed view (an MoE expert of gpt-oss) would keep its strides through clone()
    w = w if overwrite and w.dtype == torch.float32 and w.is_contiguous() else w.float().clone(
        memory_format=torch.contiguous_format)
    rows, cols = w.shape
    if zero_dead:
        w[:, torch.diagonal(hessian).to(w.device) == 0] = 0.0
    if mask is not None:
        if mask.shape != w.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool of the weight's shape {tuple(w.shape)}, got {mask.dtype} {tuple(mask.shape)}")
        pattern = Pattern(0.0)  # nothing to choose: the given mask is eliminated as it stands
    if pattern.m is not None:
        # N:M groups must not straddle a block: round the block up to a multiple of M.
        block_size = -(-block_size // pattern.m) * pattern.m
    u = inverse_hessian_factor(hessian, damp) if factor is None else factor  # (cols, cols), upper
    if u.shape != (cols, cols):
        raise ValueError(f"the factor must be ({cols}, {cols}), got {tuple(u.shape)}")
    prune = torch.zeros_like(w, dtype=torch.bool)

    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        w_blk = w[:, start:end].clone()
        u_blk = u[start:end, start:end]
        err_blk = torch.zeros_like(w_blk)
        inv_diag = torch.diagonal(u_blk)

        mask_blk = torch.zeros_like(w_blk, dtype=torch.bool) if mask is None else mask[:, start:end].to(w.device).clone()
        if mask is None and not pattern.is_nm and pattern.sparsity > 0:
            saliency = w_blk**2 / inv_diag.unsqueeze(0) ** 2  # (rows, width)
            if count == "reference":  # the released code: one threshold over the block, then <=
                flat = torch.sort(saliency.flatten()).values
                mask_blk = saliency <= flat[min(int(saliency.numel() * pattern.sparsity), flat.numel() - 1)]
            elif pattern.scope == "row":
                k = int(pattern.sparsity * end) - int(pattern.sparsity * start)
                if k > 0:
                    idx = torch.sort(saliency, dim=1, stable=True).indices[:, :k]
                    mask_blk.scatter_(1, idx, True)
            else:
                k = int(pattern.sparsity * (rows * end)) - int(pattern.sparsity * (rows * start))
                if k > 0:
                    idx = torch.sort(saliency.flatten(), stable=True).indices[:k]
                    mask_blk.view(-1)[idx] = True

        with _single_thread_on_cpu(w.device):
            _eliminate_columns(w_blk, u_blk, err_blk, mask_blk, pattern)

        w[:, start:end] = w_blk
        prune[:, start:end] = mask_blk
        # Lazy batch update of everything right of the block.
        w[:, end:] -= err_blk @ u[start:end, end:]

    w[prune] = 0.0
    return w, prune


def rows_independent(pattern: Pattern, fixed_mask: bool) -> bool:
    """Whether :func:`sparsegpt_prune` treats every row on its own: the OBS updates always do (a row's
    error moves only that row's weights); the mask choice does for a given mask, N:M groups and
    ``scope="row"``, but not for ``scope="matrix"``, which ranks a whole column block at once."""
    return fixed_mask or pattern.is_nm or pattern.scope == "row"


def sparsegpt_prune_stacked(
    weights: Sequence[Tensor],
    hessian: Tensor,
    pattern: Pattern,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    masks: Sequence[Tensor] | None = None,
    count: str = "exact",
    zero_dead: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """:func:`sparsegpt_prune` for several weights with the same input (so the same Hessian: q/k/v,
    gate/up): one (new_weight, prune_mask) per weight, in order.

    Where rows are independent (:func:`rows_independent`) they are solved as one matrix of their
    stacked rows: H^-1 is factored once and the column loop runs once for all rows, the same result
    (each row sees the same operations; tested equal) for less time. Otherwise one by one from one
    shared factor of H^-1, each solved only when the caller asks for it, so one float32 copy is alive
    at a time. Arguments are checked before anything is solved."""
    if masks is not None and len(masks) != len(weights):
        raise ValueError(f"need one mask per weight, got {len(masks)} for {len(weights)}")
    if len(weights) > 1 and rows_independent(pattern, masks is not None) and count == "exact":
        rows = [int(w.shape[0]) for w in weights]
        stacked = torch.empty(sum(rows), weights[0].shape[1], dtype=torch.float32, device=weights[0].device)
        for part, w in zip(stacked.split(rows), weights, strict=True):  # one float32 copy, worked on in place
            part.copy_(w.detach())
        new_w, prune = sparsegpt_prune(stacked, hessian, pattern, block_size=block_size, damp=damp, overwrite=True,
                                       mask=None if masks is None else torch.cat(list(masks)), zero_dead=zero_dead)
        return zip(new_w.split(rows), prune.split(rows), strict=True)
    u = inverse_hessian_factor(hessian, damp)  # one factorization for all of them
    return (sparsegpt_prune(w, hessian, pattern, block_size=block_size, damp=damp, factor=u, count=count,
                            zero_dead=zero_dead, mask=None if masks is None else masks[i]) for i, w in enumerate(weights))


def _eliminate_columns(w_blk: Tensor, u_blk: Tensor, err_blk: Tensor, mask_blk: Tensor, pattern: Pattern) -> None:
    """Prune the columns of one block left to right, in place; N:M groups are chosen as they start."""
    inv_diag = torch.diagonal(u_blk)
    for i in range(w_blk.shape[1]):
        col = w_blk[:, i]
        if pattern.m is not None and i % pattern.m == 0:
            m = pattern.m
            sal = w_blk[:, i : i + m] ** 2 / inv_diag[i : i + m].unsqueeze(0) ** 2
            lowest = torch.sort(sal, dim=1, stable=True).indices[:, : pattern.prune_per_group]
            mask_blk.scatter_(1, i + lowest, True)
        q = col.masked_fill(mask_blk[:, i], 0.0)
        err = (col - q) / u_blk[i, i]
        # OBS update of the remaining columns of this block.
        w_blk[:, i:] -= err.unsqueeze(1) @ u_blk[i, i:].unsqueeze(0)
        w_blk[:, i] = q
        err_blk[:, i] = err
