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


@pytest.mark.parametrize(("family", "overrides"), [("llama", {}), ("gemma2", {"final_logit_softcapping": 3.0}),
                                                   ("qwen3", {"tie_word_embeddings": True})])
def test_zeroshot_loglikelihoods_equal_lm_eval(family: str, overrides: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked-head HFLM gives lm-eval's own (log-likelihood, greedy) for every request, with padding
    in a batch and continuations longer than one chunk."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from llmprune.eval import chunked_lm
    from llmprune.eval import perplexity as ppl_module

    from .conftest import byte_level_tokenizer

    monkeypatch.setattr(ppl_module, "HEAD_CHUNK_BYTES", 1)  # chunks of 16 tokens (the floor)
    model = tiny_model(family, seed=3, **overrides).eval()
    tok = byte_level_tokenizer()
    gen = torch.Generator().manual_seed(1)
    requests = []
    for n, (ctx_len, cont_len) in enumerate([(5, 1), (12, 3), (3, 20), (30, 2), (8, 17), (1, 1), (9, 40)]):
        ctx = torch.randint(3, 96, (ctx_len,), generator=gen).tolist()
        cont = torch.randint(3, 96, (cont_len,), generator=gen).tolist()
        requests.append(((f"c{n}", f"x{n}"), ctx, cont))
    requests.append((("c0", "y"), requests[0][1], [int(torch.randint(3, 96, (1,), generator=gen))]))  # shared context
    ours = chunked_lm.make_lm(model, tok, batch_size=3)
    assert ours._llmprune_head is not None
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=3)
    with torch.no_grad():
        got = ours._loglikelihood_tokens(requests, disable_tqdm=True)
        want = stock._loglikelihood_tokens(requests, disable_tqdm=True)
    for (g, g_greedy), (w, w_greedy) in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-5, abs=1e-5) and g_greedy == w_greedy


@pytest.mark.parametrize("chunked", [True, False])
def test_batched_windows_give_the_same_perplexity(chunked: bool) -> None:
    """Several windows per forward (what CUDA uses) give each window's own NLL: the same perplexity."""
    from llmprune.eval.perplexity import windows_per_forward

    model = tiny_model("llama", seed=4)
    tokens = torch.randint(0, 96, (5 * 40 + 7,), generator=torch.Generator().manual_seed(2))
    one = perplexity(model, tokens, seqlen=40, chunked=chunked, batch=1)
    for batch in (2, 3, 5):
        res = perplexity(model, tokens, seqlen=40, chunked=chunked, batch=batch)
        assert res["ppl"] == pytest.approx(one["ppl"], rel=1e-6) and res["windows"] == 5, batch
        assert res["windows_per_forward"] == batch
    assert windows_per_forward(model, 40, torch.device("cpu"), 5) == 1 and one["windows_per_forward"] == 1
