"""How much LoRA capacity each decoder block gets: pure functions, tested on hand-made values.

The budget. A uniform-rank baseline puts rank ``R`` on every targeted linear. A rank-r adapter on
a linear with ``in`` inputs and ``out`` outputs trains ``r * (in + out)`` parameters, so block l
costs ``c_l = sum over its targeted linears of (in + out)`` per unit of rank, and the baseline
trains ``B = R * sum_l c_l`` parameters. After structured pruning the c_l differ (each block
keeps its own MLP width), so the budget is solved with per-block costs, never by counting ranks.

The rule (``importance_ranks``). Block l gets one rank r_l for all its targeted linears:

1. real ranks proportional to importance: ``r*_l = I_l ** power * B / sum_k c_k I_k ** power``
   (so ``sum_l c_l r*_l = B`` exactly);
2. clipped to ``[min_rank, max_rank]`` by water-filling: blocks that hit a bound are fixed there
   and the remaining budget is re-spread over the others, proportionally again, until no block
   crosses a bound (clipping keeps the order, so the result stays monotone in importance);
3. integer ranks by largest remainder with costs: every block takes ``floor(r*_l)``, then blocks
   in decreasing order of their remainder get one more rank while the next one fits in what is
   left of the budget. The integer total never exceeds ``B`` and falls short of it by less than
   one rank of one block (the report gives both numbers exactly).

Why this rule: CFSP's coarse importance (angular distance between a block's input and output)
measures how much a block changes the residual stream; the blocks that change it most are the
ones whose damage costs most, so they get the most capacity to repair it. Proportional shares are
the simplest rule with the three properties we want and test: the parameter budget equals the
uniform baseline's, a more important block never gets a smaller rank, and equal importances give
exactly the uniform ranks. ``power`` < 1 softens the allocation (``power=0`` is uniform); the
bounds keep every block trainable (``min_rank >= 1``) and stop one outlier block (SmolLM2's first
block has several times the mean importance) from taking most of the budget (``max_rank``,
default ``2 R``).

What is proportioned (chosen in :mod:`.api`): ``capacity="importance"`` uses the importance I_l
itself, the paper's literal rule. ``capacity="removed"`` uses ``I_l x s_l``, where s_l is the share
of block l's dense weights that pruning removed (:func:`.targets.removed_shares`): the importance
that pruning took away, which is what recovery has to put back. Why the second exists: CFSP already
spends its budget by importance, removing least from the most important blocks (SmolLM2's first
block keeps 99% of its channels at 20%), so the literal rule gives the most capacity to the blocks
pruning touched least. Which of the two recovers more is measured, not assumed
(``benchmarks/recovery.py``; docs/recovery.md gives the figures).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import LLMPruneError


def uniform_ranks(n_blocks: int, rank: int) -> list[int]:
    if rank < 1:
        raise LLMPruneError(f"the LoRA rank must be at least 1, got {rank}")
    return [rank] * n_blocks


def trainable_params(ranks: Sequence[int], costs: Sequence[int]) -> int:
    """LoRA parameters trained for per-block ``ranks`` with per-block per-rank ``costs``."""
    return sum(r * c for r, c in zip(ranks, costs, strict=True))


def importance_ranks(importance: Sequence[float], costs: Sequence[int], rank: int, *, power: float = 1.0,
                     min_rank: int = 1, max_rank: int | None = None) -> list[int]:
    """Per-block ranks proportional to ``importance ** power`` whose parameter count matches ``rank``
    on every block as closely as integers allow (never above it). See the module docstring."""
    n = len(importance)
    if n == 0 or len(costs) != n:
        raise LLMPruneError(f"need one importance and one cost per block, got {n} and {len(costs)}")
    if rank < 1:
        raise LLMPruneError(f"the LoRA rank must be at least 1, got {rank}")
    if any(c <= 0 for c in costs):
        raise LLMPruneError(f"per-rank costs must be positive, got {list(costs)}")
    if any(not math.isfinite(i) or i < 0 for i in importance):
        raise LLMPruneError(f"block importances must be finite and >= 0, got {list(importance)}")
    if power < 0:
        raise LLMPruneError(f"the importance power must be >= 0, got {power}")
    max_rank = 2 * rank if max_rank is None else max_rank
    if not 1 <= min_rank <= rank <= max_rank:
        raise LLMPruneError(f"need 1 <= min_rank <= rank <= max_rank, got {min_rank}, {rank}, {max_rank}")
    weights = [float(i) ** power if power > 0 else 1.0 for i in importance]
    if sum(weights) == 0:
        weights = [1.0] * n
    budget = rank * sum(costs)

    # water-filling: fix blocks at a bound, spread the rest proportionally
    fixed: dict[int, float] = {}
    while True:
        free = [i for i in range(n) if i not in fixed]
        left = budget - sum(costs[i] * r for i, r in fixed.items())
        denom = sum(costs[i] * weights[i] for i in free)
        if not free:
            break
        real = {i: (left * weights[i] / denom if denom > 0 else left / sum(costs[j] for j in free)) for i in free}
        low = [i for i in free if real[i] < min_rank]
        high = [i for i in free if real[i] > max_rank]
        if not low and not high:
            fixed.update(real)
            break
        # fix the side that is violated most (in budget terms) first; the other may resolve itself
        excess = sum(costs[i] * (real[i] - max_rank) for i in high)
        deficit = sum(costs[i] * (min_rank - real[i]) for i in low)
        for i in (high if excess >= deficit else low):
            fixed[i] = float(max_rank if i in high else min_rank)
    real_ranks = [fixed[i] for i in range(n)]

    eps = 1e-9  # real ranks that are integers up to float error must not lose a unit to floor()
    ranks = [int(math.floor(r + eps)) for r in real_ranks]
    left = budget - trainable_params(ranks, costs)
    order = sorted(range(n), key=lambda i: (-(real_ranks[i] - ranks[i]), -importance[i], i))
    for i in order:
        if real_ranks[i] - ranks[i] <= eps or ranks[i] >= max_rank or costs[i] > left:
            break
        ranks[i] += 1
        left -= costs[i]
    return ranks
