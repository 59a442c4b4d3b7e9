"""Perplexity over non-overlapping windows (the pruning papers' protocol).

The token stream is cut into ``len // seqlen`` windows of exactly ``seqlen`` tokens (the tail is
dropped); each window is scored independently; perplexity = exp(mean over windows of the mean
next-token NLL in the window), which is what SparseGPT's ``llama_eval`` computes. ``windows`` caps
the number of windows (the first ones) to bound the cost on CPU; the report records both counts.

Memory: the [seqlen x vocabulary] logits are never materialized whole. The decoder runs to its
final hidden states, then the head (and the family's logit post-processing: Gemma-2/3's
``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``, applied in
place) and the loss run over chunks of tokens in float32, summed in float64. A chunk's logits take
at most ``HEAD_CHUNK_BYTES`` (32 MiB: 32 tokens of Gemma-3's 262,144 words, 170 of SmolLM2's 49,152;
never fewer than 16 tokens), whatever the vocabulary and seqlen. Gemma-3-270M at seqlen 2048 held
2 GB of logits plus a copy and the log-softmax. Each
call first checks, on a short prefix, that the chunked head gives the model's own logits; a model
whose head it cannot reproduce (an unknown post-processing) is evaluated with full logits, and a
warning says so.

Batching: on CUDA several windows go through one forward (:func:`windows_per_forward`: as many as
a quarter of the free GPU memory holds by an estimate of one window's activations, at most 8); each
window's NLL is its own, so the result is the same to rounding. On CPU one window at a time (no
faster, and memory is what is scarce there).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..engine.context import calibration_mode
from ..errors import LLMPruneError

log = logging.getLogger(__name__)
HEAD_CHUNK_BYTES = 32 * 2**20  # float32 logits that exist at once
_CHECK_TOKENS = 16
_CHECK_RTOL = 1e-4


class _Head:
    """A causal LM split into its decoder (to the final hidden states) and its head plus post-processing."""

    def __init__(self, model: nn.Module) -> None:
        prefix = getattr(model, "base_model_prefix", "")
        self.decoder = getattr(model, prefix, None) if prefix else None
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not isinstance(self.decoder, nn.Module) or self.decoder is model or not isinstance(self.head, nn.Module):
            raise TypeError(f"{type(model).__name__} has no separate decoder and output head")
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.scale = getattr(config, "logit_scale", None)  # Cohere multiplies
        self.divide = getattr(config, "logits_scaling", None)  # Granite divides

    def hidden(self, ids: Tensor) -> Tensor:
        return self.decoder(input_ids=ids, use_cache=False).last_hidden_state

    def logits(self, hidden: Tensor) -> Tensor:
        logits = self.head(hidden).float()  # a new tensor: the post-processing may work in place
        if self.scale is not None:
            logits.mul_(self.scale)
        if self.divide is not None:
            logits.div_(self.divide)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def chunk_tokens(self) -> int:
        """Tokens per chunk: their float32 logits fit in ``HEAD_CHUNK_BYTES``."""
        vocab = getattr(self.head, "out_features", None) or int(self.head.weight.shape[0])
        return max(16, HEAD_CHUNK_BYTES // (4 * int(vocab)))


def chunked_head(model: nn.Module, probe: Tensor) -> _Head | None:
    """The model's head, split off and checked against its own logits on ``probe`` (ids [1, T]); None
    when it cannot be split or does not reproduce them (then evaluate with full logits)."""
    try:
        head = _Head(model)
        with torch.no_grad():
            want = model(input_ids=probe, use_cache=False).logits.float()
            got = head.logits(head.hidden(probe))
    except (TypeError, AttributeError, ValueError, RuntimeError) as exc:
        log.warning("evaluating %s with full logits: its head cannot be split off (%s)", type(model).__name__, exc)
        return None
    if got.shape != want.shape or not torch.allclose(got, want, rtol=_CHECK_RTOL, atol=_CHECK_RTOL * float(
            want.abs().max())):
        log.warning("evaluating %s with full logits: its output head has a post-processing llmprune does not "
                    "reproduce (the chunked head differs from the model's logits)", type(model).__name__)
        return None
    return head


def window_nll(model: nn.Module, ids: Tensor, head: _Head | None, chunk: int | None = None) -> float:
    """Mean next-token NLL of one window ``ids`` [1, T]: chunked through ``head`` (``chunk`` tokens at a
    time; default: :meth:`_Head.chunk_tokens`), or from full logits."""
    targets = ids[0, 1:]
    if head is None:
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        return F.cross_entropy(logits, targets, reduction="mean").item()
    return _chunked_nll(head, head.hidden(ids)[0, :-1], targets, chunk or head.chunk_tokens())


def _chunked_nll(head: _Head, hidden: Tensor, targets: Tensor, chunk: int) -> float:
    """Mean NLL of ``targets`` [T] from the hidden states [T, d] that predict them, ``chunk`` tokens at a time."""
    total = 0.0
    for start in range(0, hidden.shape[0], chunk):
        logits = head.logits(hidden[start:start + chunk])
        total += float(F.cross_entropy(logits, targets[start:start + chunk], reduction="sum").double())
        del logits
    return total / targets.numel()


def batch_nll(model: nn.Module, ids: Tensor, head: _Head | None) -> list[float]:
    """Mean next-token NLL of each window of ``ids`` [B, T] (windows scored independently)."""
    if ids.shape[0] == 1:
        return [window_nll(model, ids, head)]
    if head is None:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return [float(v) for v in losses.double().mean(dim=1)]
    hidden = head.hidden(ids)
    return [_chunked_nll(head, hidden[row, :-1], ids[row, 1:], head.chunk_tokens()) for row in range(ids.shape[0])]


def windows_per_forward(model: nn.Module, seqlen: int, device: torch.device, count: int) -> int:
    """Windows per forward: 1 on CPU; on CUDA what a quarter of the free memory holds (estimate), at most 8."""
    if device.type != "cuda" or count <= 1:
        return 1
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(getattr(config, "hidden_size", 4096))
    inter = int(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 32))
    itemsize = next(model.parameters()).element_size()
    per_window = itemsize * seqlen * (6 * hidden + 3 * inter + heads * seqlen)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(8, count, int(free // 4 // max(per_window, 1))))


def perplexity(
    model: nn.Module,
    tokens: Tensor,
    *,
    seqlen: int,
    windows: int | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    desc: str = "perplexity",
    chunked: bool = True,
    batch: int | None = None,
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
        head = chunked_head(model, tokens[:min(_CHECK_TOKENS, seqlen)].unsqueeze(0).to(device)) if chunked else None
        per = batch or windows_per_forward(model, seqlen, device, count)
        bar = tqdm(total=count, desc=desc, disable=not progress, unit="window")
        for first in range(0, count, per):
            last = min(first + per, count)
            ids = tokens[first * seqlen : last * seqlen].view(last - first, seqlen).to(device)
            for w, nll in enumerate(batch_nll(model, ids, head), start=first):
                if not math.isfinite(nll):
                    raise LLMPruneError(f"non-finite loss in evaluation window {w}; the model produces NaN/inf")
                total += nll
            bar.update(last - first)
        bar.close()
    mean_nll = total / count
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "seqlen": seqlen,
        "windows": count,
        "windows_available": available,
        "windows_per_forward": per,
    }
