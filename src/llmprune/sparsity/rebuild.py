"""LLM-Barber's mask rebuilding rule (Su, Guan et al., arXiv 2408.10631, Sec. 3.3; reference code
``mask_rebuild`` in ``lib/llama.py`` of github.com/YupengSu/LLM-Barber). Pure tensor code.

``rebuild_mask(prune_mask, scores, ratio, granularity)`` returns a new prune mask (True = prune)
with the same number of pruned weights in every comparison group. Within one group:

* growth = scores of the currently pruned weights, sorted descending;
* prune = scores of the currently kept weights, sorted ascending;
* r = #{k : growth[k] > prune[k]} (the swaps that would raise the total kept score; since growth
  is non-increasing and prune non-decreasing these are a prefix);
* the top ``floor(ratio * r)`` pruned weights are regrown and as many lowest-scoring kept weights
  are pruned.

Comparison groups ("granularity"): ``output`` (each row; the reference default), ``input`` (each
column), ``layer`` (one matrix), ``block`` (all the matrices passed together; per-matrix
sparsity may drift, the block total is exact).

N:M (``m`` given): the growth set is chosen as above, then inside each M-group of a row exactly as
many of the group's lowest-scoring previously kept weights are pruned as were grown in it, so
every group keeps as many weights as before (exactly N for a valid N:M mask). Regrown weights are
never pruned again in the same call.

Differences from the reference code, and why:

* Exact counts: the reference picks by thresholds (``score > growth[int(r * ratio)]``), which on
  ties swaps more or fewer weights than ``floor(ratio * r)`` and can break group sparsity; here
  the selection is by rank with a stable sort (lower index first among ties), as in ``select.py``.
* Vectorised over rows/columns (the reference loops over rows in Python for N:M and per-row),
  with one sort per matrix for r and ``topk`` for the few swaps (the rule as written needs two
  full sorts; see :func:`beneficial_swaps`).
* N:M is not limited to output granularity at 50 %: ``layer`` and ``block`` choose the growth
  budget over the matrix / block and compensate per M-group, which keeps every group at exactly N
  and every matrix's sparsity exact. ``input`` is refused: compensation must happen in the same
  row group, i.e. in other columns, so the column (the comparison group) could not keep its
  sparsity.
* Any N:M: when more weights of one M-group are grown than it had kept (possible only when
  M - N > N, e.g. 1:4), only the best-scoring grown ones up to the kept count are regrown, so the
  swaps in that row can be fewer than ``floor(ratio * r)``. The reference never meets this case.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal, overload

import torch
from torch import Tensor

from ..errors import LLMPruneError

Granularity = Literal["block", "layer", "output", "input"]
GRANULARITIES: tuple[str, ...] = ("block", "layer", "output", "input")
NM_GRANULARITIES: tuple[str, ...] = ("block", "layer", "output")
NM_RULES: tuple[str, ...] = ("reference", "paired")


def beneficial_swaps(prune_mask: Tensor, scores: Tensor) -> Tensor:
    """r per row of (groups, size) tensors: #{k : growth[k] > prune[k]}.

    Computed from one sort: r is the largest k for which some threshold t has k pruned scores
    above it and k kept scores below it, i.e. the maximum over the boundaries between distinct
    sorted values of min(#kept below, #pruned above). (If growth[k-1] > prune[k-1], a t between
    them works; conversely such a t gives growth[k-1] > t > prune[k-1].)
    """
    values, order = torch.sort(scores.float(), dim=1)
    pruned_upto = torch.cumsum(prune_mask.gather(1, order).to(torch.int32), dim=1)  # pruned in sorted[0..j]
    position = torch.arange(1, scores.shape[1] + 1, device=scores.device, dtype=torch.int32)
    kept_below = position - pruned_upto  # kept among sorted[0..j]
    pruned_above = pruned_upto[:, -1:] - pruned_upto  # pruned among sorted[j+1..]
    pairs = torch.minimum(kept_below, pruned_above)
    # Only where a threshold fits strictly between sorted[j] and sorted[j+1] (the last j gives 0).
    pairs[:, :-1].masked_fill_(values[:, :-1] == values[:, 1:], 0)
    return pairs.max(dim=1).values.to(torch.int64)


def _largest(values: Tensor, count: Tensor) -> Tensor:
    """Mark the ``count[g]`` largest entries of each row (ties: lower index first). values: (groups, size)."""
    k = int(count.max())
    if k == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    top = torch.topk(values, k, dim=1).values  # (groups, k), descending
    threshold = top.gather(1, (count - 1).clamp(min=0).unsqueeze(1))  # the count-th largest value
    above = values > threshold
    at = values == threshold
    needed = count.unsqueeze(1) - above.sum(dim=1, keepdim=True)
    chosen = above | (at & (torch.cumsum(at, dim=1) <= needed))
    return chosen & (count > 0).unsqueeze(1)


# Rows are independent, so the swap rule runs on blocks of rows of at most this many entries: its
# sort, ranks and cumulative counts take about 30 bytes per entry (1.4 GB for one 11008 x 4096
# matrix of a 7B model at once; ~120 MB per block), with bit-identical results.
CHUNK_ENTRIES = 1 << 22


COUNT_MODES = ("exact", "float32")
_COUNT: ContextVar[str] = ContextVar("llmprune_swap_count", default="exact")


@contextmanager
def counting(mode: str) -> Iterator[None]:
    """Within the block, swap counts are computed as ``mode`` says (see :func:`swap_count`)."""
    if mode not in COUNT_MODES:
        raise LLMPruneError(f"unknown swap count {mode!r}; known: {', '.join(COUNT_MODES)}")
    token = _COUNT.set(mode)
    try:
        yield
    finally:
        _COUNT.reset(token)


def swap_count(ratio: float, r: Tensor) -> Tensor:
    """How many of ``r`` (int64) beneficial swaps are applied: ``floor(ratio * r)`` in IEEE double
    (``exact``), or as the released code computes it (``float32``: an int64 tensor times a Python
    float is a float32 product, truncated), which is one more at some ratios (r=100 at 0.29: 29
    against 28) and loses integers above 2^24."""
    if _COUNT.get() == "float32":
        return (r.to(torch.int64) * ratio).to(torch.int64)
    return torch.floor(ratio * r.to(torch.float64)).to(torch.int64)


def swap_selection(prune_mask: Tensor, scores: Tensor, ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """The swap rule applied independently to each row of (groups, size) tensors.

    Returns (grow, prune, r): ``grow`` marks the ``floor(ratio * r)`` best pruned weights of each
    row, ``prune`` the same number of worst kept weights, ``r`` (groups,) the beneficial swap count.
    Among equal scores the lower index is regrown / pruned first (what a stable sort gives).
    """
    rows = max(1, CHUNK_ENTRIES // max(1, prune_mask.shape[1]))
    if prune_mask.shape[0] <= rows:
        return _swap_selection(prune_mask, scores, ratio)
    parts = [_swap_selection(mask, score, ratio) for mask, score in zip(prune_mask.split(rows), scores.split(rows),
                                                                           strict=True)]
    return tuple(torch.cat(part) for part in zip(*parts, strict=True))  # type: ignore[return-value]


def _swap_selection(prune_mask: Tensor, scores: Tensor, ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    scores = scores.float()
    r = beneficial_swaps(prune_mask, scores)
    count = swap_count(ratio, r)
    grow = _largest(scores.masked_fill(~prune_mask, float("-inf")), count)
    prune = _largest((-scores).masked_fill(prune_mask, float("-inf")), count)
    return grow, prune, r


def _rank_in_groups(values: Tensor, descending: bool) -> Tensor:
    """Rank (0 = first) of every entry along the last dim under a stable sort."""
    order = torch.sort(values, dim=-1, descending=descending, stable=True).indices
    ranks = torch.arange(values.shape[-1], device=values.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)


def _compensate_n_of_m(prune_mask: Tensor, grow: Tensor, scores: Tensor, m: int) -> Tensor:
    """Apply ``grow`` to an N:M mask and prune, in each M-group, as many kept weights as were grown."""
    rows, cols = prune_mask.shape
    mask3 = prune_mask.reshape(rows, cols // m, m)  # (rows, groups, m)
    grow3 = grow.reshape(rows, cols // m, m) & mask3
    score3 = scores.float().reshape(rows, cols // m, m)
    kept3 = ~mask3
    capacity = kept3.sum(dim=-1, keepdim=True)
    grown = grow3.sum(dim=-1, keepdim=True)
    if bool((grown > capacity).any()):
        # Keep only the best-scoring grown weights, up to the group's kept count.
        grow_rank = _rank_in_groups(score3.masked_fill(~grow3, float("-inf")), descending=True)
        grow3 = grow3 & (grow_rank < capacity)
        grown = torch.minimum(grown, capacity)
    prune_rank = _rank_in_groups(score3.masked_fill(~kept3, float("inf")), descending=False)
    prune3 = kept3 & (prune_rank < grown)
    return ((mask3 & ~grow3) | prune3).reshape(rows, cols)


def paired_swaps(prune_mask: Tensor, scores: Tensor, ratio: float, m: int, granularity: str = "output",
                 ) -> tuple[Tensor, Tensor]:
    """The ``paired`` N:M rule (an llmprune extension): swaps are chosen as pairs inside one M-group.

    In every M-group the candidate swap is (best-scoring pruned weight, worst-scoring kept weight),
    its gain the difference of their scores. r = the groups with a positive gain, counted per
    comparison group (a row for ``output``, the matrix for ``layer``); the ``floor(ratio * r)``
    largest-gain candidates are swapped. So every swap raises the total score, which the reference
    rule does not guarantee under N:M: it picks the regrown weights by the row-level comparison and
    then prunes the group's worst kept weight whatever its score. At most one swap per group per call.

    Returns (grow, prune) masks of the matrix's shape. ``block`` granularity goes through
    :func:`rebuild_mask`, which concatenates the matrices' rows.
    """
    rows, cols = prune_mask.shape
    mask3 = prune_mask.reshape(rows, cols // m, m)
    score3 = scores.float().reshape(rows, cols // m, m)
    best, best_at = score3.masked_fill(~mask3, float("-inf")).max(dim=-1)
    worst, worst_at = score3.masked_fill(mask3, float("inf")).min(dim=-1)
    gain = best - worst  # -inf or nan-free: groups lacking a pruned or a kept weight give -inf
    gain = torch.where(torch.isfinite(best) & torch.isfinite(worst), gain, torch.full_like(gain, float("-inf")))
    beneficial = gain > 0
    if granularity == "output":
        count = swap_count(ratio, beneficial.sum(dim=1))
        chosen = _largest(gain.masked_fill(~beneficial, float("-inf")), count)
    else:  # one comparison group for the whole matrix
        flat = gain.masked_fill(~beneficial, float("-inf")).reshape(1, -1)
        count = swap_count(ratio, beneficial.sum()).reshape(1)
        chosen = _largest(flat, count).reshape(gain.shape)
    grow = torch.zeros_like(mask3).scatter_(-1, best_at.unsqueeze(-1), chosen.unsqueeze(-1))
    prune = torch.zeros_like(mask3).scatter_(-1, worst_at.unsqueeze(-1), chosen.unsqueeze(-1))
    return grow.reshape(rows, cols), prune.reshape(rows, cols)


def _check(masks: list[Tensor], scores: list[Tensor], ratio: float, granularity: str, m: int | None) -> None:
    if not 0.0 <= float(ratio) <= 1.0:
        raise LLMPruneError(f"rebuild ratio must be in [0, 1], got {ratio!r}")
    if granularity not in GRANULARITIES:
        raise LLMPruneError(f"unknown rebuild granularity {granularity!r}; known: {', '.join(GRANULARITIES)}")
    if m is not None and granularity not in NM_GRANULARITIES:
        raise LLMPruneError(
            f"granularity {granularity!r} cannot be rebuilt under an N:M pattern: the pruned weights that "
            f"compensate a regrown one lie in other columns of its M-group, so the column would not keep its "
            f"sparsity; use one of {', '.join(NM_GRANULARITIES)}"
        )
    if not masks or len(masks) != len(scores):
        raise ValueError("give one score matrix per mask (at least one)")
    for mask, score in zip(masks, scores, strict=True):
        if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape != score.shape:
            raise ValueError(f"masks must be 2-D bool with the shape of their scores, got {mask.dtype} "
                             f"{tuple(mask.shape)} vs {tuple(score.shape)}")
        if torch.isnan(score).any() or torch.isinf(score).any():
            raise ValueError("rebuild scores must be finite")
        if m is not None and mask.shape[1] % m:
            raise ValueError(f"N:M group size {m} does not divide the input width {mask.shape[1]}")


@overload
def rebuild_mask(prune_mask: Tensor, scores: Tensor, ratio: float, granularity: str = ...,
                 *, m: int | None = ..., nm_rule: str = ...) -> Tensor: ...
@overload
def rebuild_mask(prune_mask: Sequence[Tensor], scores: Sequence[Tensor], ratio: float, granularity: str = ...,
                 *, m: int | None = ..., nm_rule: str = ...) -> list[Tensor]: ...


def rebuild_mask(
    prune_mask: Tensor | Sequence[Tensor],
    scores: Tensor | Sequence[Tensor],
    ratio: float,
    granularity: str = "output",
    *,
    m: int | None = None,
    nm_rule: str = "reference",
) -> Tensor | list[Tensor]:
    """The rebuilt prune mask(s) (True = prune) of (out_features, in_features) matrices.

    A single tensor returns a tensor; a sequence (several matrices, e.g. a whole sub-block for
    ``block`` granularity) returns a list. ``m``: the M of an N:M pattern the masks follow.
    Higher scores are more important. ``ratio = 0`` returns the masks unchanged. ``nm_rule``
    (with ``m``): ``reference`` (the paper's) or ``paired`` (:func:`paired_swaps`).
    """
    single = isinstance(prune_mask, Tensor)
    masks = [prune_mask] if isinstance(prune_mask, Tensor) else list(prune_mask)
    score_list = [scores] if isinstance(scores, Tensor) else list(scores)
    _check(masks, score_list, ratio, granularity, m)
    if nm_rule not in NM_RULES:
        raise LLMPruneError(f"unknown N:M rebuild rule {nm_rule!r}; known: {', '.join(NM_RULES)}")
    if ratio == 0:
        out = [mask.clone() for mask in masks]
        return out[0] if single else out
    if m is not None and nm_rule == "paired":
        if granularity == "block":  # one comparison group: every M-group of every matrix (rows of width m)
            grow, prune = paired_swaps(torch.cat([mask.reshape(-1, m) for mask in masks]),
                                       torch.cat([score.float().reshape(-1, m) for score in score_list]), ratio, m, "layer")
            sizes = [mask.numel() for mask in masks]
            out = [(mask & ~g.reshape(mask.shape)) | p.reshape(mask.shape)
                   for mask, g, p in zip(masks, grow.reshape(-1).split(sizes), prune.reshape(-1).split(sizes), strict=True)]
        else:
            out = []
            for mask, score in zip(masks, score_list, strict=True):
                grow, prune = paired_swaps(mask, score, ratio, m, granularity)
                out.append((mask & ~grow) | prune)
        return out[0] if single else out

    grows: list[Tensor]
    prunes: list[Tensor]
    if granularity == "output":
        picks = [swap_selection(mask, score, ratio) for mask, score in zip(masks, score_list, strict=True)]
        grows, prunes = [p[0] for p in picks], [p[1] for p in picks]
    elif granularity == "input":
        picks = [swap_selection(mask.t(), score.t(), ratio) for mask, score in zip(masks, score_list, strict=True)]
        grows, prunes = [p[0].t() for p in picks], [p[1].t() for p in picks]
    elif granularity == "layer":
        picks = [swap_selection(mask.reshape(1, -1), score.reshape(1, -1), ratio) for mask, score in zip(masks, score_list, strict=True)]
        grows = [p[0].reshape(mask.shape) for p, mask in zip(picks, masks, strict=True)]
        prunes = [p[1].reshape(mask.shape) for p, mask in zip(picks, masks, strict=True)]
    else:  # block: one comparison group over every matrix
        flat_grow, flat_prune, _ = swap_selection(
            torch.cat([mask.reshape(-1) for mask in masks]).unsqueeze(0),
            torch.cat([score.float().reshape(-1) for score in score_list]).unsqueeze(0),
            ratio,
        )
        sizes = [mask.numel() for mask in masks]
        grows = [g.reshape(mask.shape) for g, mask in zip(flat_grow[0].split(sizes), masks, strict=True)]
        prunes = [p.reshape(mask.shape) for p, mask in zip(flat_prune[0].split(sizes), masks, strict=True)]

    if m is None:
        out = [(mask & ~grow) | prune for mask, grow, prune in zip(masks, grows, prunes, strict=True)]
    else:
        out = [_compensate_n_of_m(mask, grow, score, m) for mask, grow, score in zip(masks, grows, score_list, strict=True)]
    return out[0] if single else out
