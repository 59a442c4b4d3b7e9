"""Perplexity with a chunked head equals the full-logits computation, for every family."""

from __future__ import annotations

import logging

import pytest
import torch

from llmprune.eval.perplexity import chunked_head, perplexity, window_nll

from .conftest import FAMILIES, tiny_model

CASES = [(f, {}) for f in FAMILIES] + [
    ("llama", {"tie_word_embeddings": True}),
    ("gemma2", {"final_logit_softcapping": 3.0}),  # small cap: the tanh matters
    ("gemma3", {"final_logit_softcapping": 2.0}),
]


@pytest.mark.parametrize(("family", "overrides"), CASES, ids=[f"{f}-{'-'.join(o) or 'default'}" for f, o in CASES])
def test_chunked_perplexity_equals_full_logits(family: str, overrides: dict) -> None:
    model = tiny_model(family, seed=1, **overrides)
    tokens = torch.randint(0, 96, (3 * 40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        head = chunked_head(model, tokens[:16].unsqueeze(0))
        assert head is not None, family
        for w in range(3):
            ids = tokens[w * 40:(w + 1) * 40].unsqueeze(0)
            full = window_nll(model, ids, None)
            for chunk in (7, 16, 64):  # uneven, even, one chunk
                assert window_nll(model, ids, head, chunk) == pytest.approx(full, rel=1e-5), (family, chunk)
    chunked = perplexity(model, tokens, seqlen=40)
    full = perplexity(model, tokens, seqlen=40, chunked=False)
    assert chunked["ppl"] == pytest.approx(full["ppl"], rel=1e-5)


def test_an_unknown_head_post_processing_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model("llama", seed=2)
    forward = model.forward

    def doubled(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2  # a post-processing the chunked head does not know
        return out

    model.forward = doubled  # type: ignore[method-assign]
    tokens = torch.randint(0, 96, (80,), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="llmprune"), torch.no_grad():
        assert chunked_head(model, tokens[:16].unsqueeze(0)) is None
    assert "full logits" in caplog.text
    assert perplexity(model, tokens, seqlen=40)["ppl"] == pytest.approx(
        perplexity(model, tokens, seqlen=40, chunked=False)["ppl"], rel=1e-7)
