"""Token windows for calibration and evaluation, following the papers' protocols."""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import LLMPruneError
from .sources import TextSource, read_documents

log = logging.getLogger(__name__)


def token_hash(ids: Tensor) -> str:
    """Short SHA-256 of a token tensor: proves two runs calibrated on the very same tokens."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def _encode(tokenizer: Any, text: str) -> list[int]:
    # Long texts exceed model_max_length by design; the warning is noise here.
    old = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e30)
    try:
        return list(tokenizer(text)["input_ids"])
    finally:
        tokenizer.model_max_length = old


def calibration_windows(tokenizer: Any, source: TextSource, nsamples: int, seqlen: int, seed: int) -> Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, seeded: (nsamples, seqlen) int64.

    Document sources (C4, JSON lines, parquet rows): as SparseGPT/Wanda do, each window comes
    from a random document longer than ``seqlen`` tokens at a random offset. WikiText-2 and plain
    text files are one stream (rows joined with a space, as the reference ``get_wikitext2``), and
    windows start at random offsets in it. A document source with no document that long falls back
    to the joined stream, with a warning.
    """
    if nsamples < 1 or seqlen < 2:
        raise LLMPruneError(f"calibration needs nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    docs = read_documents(source)
    rng = random.Random(seed)
    windows: list[list[int]] = []
    streams: list[list[int]]
    if source.name == "wikitext2" or source.path.endswith(".txt"):
        streams = [_encode(tokenizer, " ".join(docs))]
    else:
        encoded = [_encode(tokenizer, d) for d in docs if d.strip()]
        streams = [ids for ids in encoded if len(ids) > seqlen]
        if not streams:
            log.warning("no document in %s is longer than %d tokens; sampling from the joined text", source.path, seqlen)
            streams = [[t for ids in encoded for t in ids]]
    if len(streams[0]) <= seqlen and len(streams) == 1:
        raise LLMPruneError(
            f"calibration data {source.path} has {len(streams[0])} tokens, shorter than one window of "
            f"{seqlen}; use more text or a smaller --seqlen"
        )
    for _ in range(nsamples):
        ids = streams[rng.randrange(len(streams))]
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


def evaluation_tokens(tokenizer: Any, source: TextSource, max_tokens: int | None = None) -> Tensor:
    """The evaluation token stream (1-D int64).

    WikiText-2: rows joined with "\\n\\n" and tokenized once (SparseGPT's ``get_wikitext2``). C4: documents
    joined with a space (SparseGPT's ``get_c4``). Other files: documents joined with "\\n\\n".
    """
    docs = read_documents(source)
    joiner = " " if source.name == "c4" else "\n\n"
    ids = _encode(tokenizer, joiner.join(docs))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def evaluation_sets(tokenizer: Any, sources: list[TextSource]) -> dict[str, Tensor]:
    """Evaluation token streams keyed by the name reports use: the dataset's, or a local file's stem."""
    return {src.name if src.name != "file" else Path(src.path).stem: evaluation_tokens(tokenizer, src)
            for src in sources}
