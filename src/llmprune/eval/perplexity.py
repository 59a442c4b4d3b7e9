"""Perplexity over non-overlapping windows (the pruning papers' protocol).

The token stream is cut into ``len // seqlen`` windows of exactly ``seqlen`` tokens (the tail is
dropped); each window is scored independently; perplexity = exp(mean over windows of the mean
next-token NLL in the window), which is what SparseGPT's ``llama_eval`` computes. ``windows`` caps
the number of windows (the first ones) to bound the cost on CPU; the report records both counts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..engine.context import calibration_mode
from ..errors import LLMPruneError


def perplexity(
    model: nn.Module,
    tokens: Tensor,
    *,
    seqlen: int,
    windows: int | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    desc: str = "perplexity",
) -> dict[str, Any]:
    if seqlen < 2:
        raise LLMPruneError(f"evaluation seqlen must be at least 2, got {seqlen}")
    available = tokens.numel() // seqlen
    if available == 0:
        raise LLMPruneError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    if windows is not None and windows < 1:
        raise LLMPruneError(f"--eval-windows must be at least 1, got {windows}")
    count = available if windows is None else min(windows, available)
    device = device or next(model.parameters()).device
    total = 0.0
    with calibration_mode(model):
        for w in tqdm(range(count), desc=desc, disable=not progress, unit="window"):
            ids = tokens[w * seqlen : (w + 1) * seqlen].unsqueeze(0).to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            nll = F.cross_entropy(logits, ids[0, 1:], reduction="mean").item()
            if not math.isfinite(nll):
                raise LLMPruneError(f"non-finite loss in evaluation window {w}; the model produces NaN/inf")
            total += nll
    mean_nll = total / count
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "seqlen": seqlen,
        "windows": count,
        "windows_available": available,
    }
