#!/usr/bin/env python3
"""What the exact fixed-mask solver (``reconstruct_solver=exact``) costs at 7B widths, on this CPU.

For each shape (rows x cols: LLaMA-7B's q/k/v/o 4096 x 4096 and gate/up 11008 x 4096), a random
weight, the input Hessian X^T X of synthetic activations (2 * cols tokens of correlated inputs with
a few outlier channels, as LLM activations have) and a 50% mask (the lowest Wanda scores of each
row) are solved by :func:`llmprune.sparsity.exact_solver.masked_least_squares`, once, and where the
time goes is recorded: the factorization of H and H^-1, the OBS starting point, the conjugate
gradients and their step count. Real Hessians can need more steps than these synthetic ones.

    .venv/bin/python benchmarks/exact_solver_cost.py --output /tmp/exact_solver_cost.json
    .venv/bin/python benchmarks/exact_solver_cost.py --shapes 1024x1024 --output /tmp/small.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def problem(rows: int, cols: int, seed: int = 0) -> tuple[Any, Any, Any]:
    import torch

    from llmprune.sparsity.patterns import Pattern
    from llmprune.sparsity.scores import wanda
    from llmprune.sparsity.select import prune_mask

    g = torch.Generator().manual_seed(seed)
    tokens = 2 * cols
    mix = torch.randn(cols, 64, generator=g) / 8
    x = torch.randn(tokens, cols, generator=g) + torch.randn(tokens, 64, generator=g) @ mix.T
    x[:, torch.randperm(cols, generator=g)[: max(1, cols // 256)]] *= 20.0  # outlier channels
    hessian = x.T @ x
    del x
    weight = torch.randn(rows, cols, generator=g) * 0.02
    mask = prune_mask(wanda(weight, torch.diagonal(hessian)), Pattern(0.5))
    return weight, hessian, mask


def measure(shape: str) -> dict[str, Any]:
    import torch

    from llmprune.sparsity.exact_solver import masked_least_squares

    rows, cols = (int(v) for v in shape.lower().split("x"))
    weight, hessian, mask = problem(rows, cols)
    info: dict[str, float] = {}
    start = time.perf_counter()
    masked_least_squares(weight, hessian, mask, info=info)
    total = time.perf_counter() - start
    return {"shape": [rows, cols], "sparsity": 0.5, "total_s": round(total, 2),
            **{k: round(v, 2) if k.endswith("_s") else int(v) for k, v in info.items()},
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    from llmprune.report import cpu_model

    rows = []
    for shape in args.shapes:
        rows.append(measure(shape))
        print(json.dumps(rows[-1]), flush=True)
    result = {"cpu": cpu_model(), "rows": rows}
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
