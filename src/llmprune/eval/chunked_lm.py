"""lm-eval's ``HFLM`` with log-likelihoods scored through the chunked head (bounded logits memory).

Stock ``HFLM._loglikelihood_tokens`` turns a whole batch into ``[batch x length x vocabulary]``
logits and their log-softmax before it slices out the continuation: with a 262,144-word vocabulary
(Gemma-3) a batch of 8 requests of 128 tokens is 2 GB, twice. Here the decoder runs the padded
batch to its final hidden states (the same inputs as lm-eval builds: context + continuation,
truncated from the left to the model's length, the last token dropped, right-padded, no attention
mask), and only the continuation positions go through the head, in chunks whose float32 logits
take at most :data:`~llmprune.eval.perplexity.HEAD_CHUNK_BYTES`. Each request's answer is what
lm-eval computes: the sum of the continuation's log-probabilities and whether greedy decoding
reproduces it. Generation and everything else stay lm-eval's.

A model whose head cannot be split off and reproduced (:func:`~llmprune.eval.perplexity.chunked_head`)
and non-causal backends are scored by lm-eval's own code.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from .perplexity import chunked_head

log = logging.getLogger(__name__)


def continuation_scores(head: Any, hidden: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """(sum of log p(cont), greedy reproduces cont) from the hidden states ``[len(cont), d]`` that predict it."""
    target = torch.tensor(cont, dtype=torch.long, device=hidden.device)
    chunk = head.chunk_tokens()
    total, greedy = 0.0, True
    for start in range(0, len(cont), chunk):
        logp = F.log_softmax(head.logits(hidden[start:start + chunk]), dim=-1)
        want = target[start:start + chunk]
        total += float(logp.gather(1, want.unsqueeze(1)).sum())
        greedy = greedy and bool((logp.argmax(dim=-1) == want).all())
        del logp
    return total, greedy


def make_lm(model: Any, tokenizer: Any, batch_size: int | str) -> Any:
    """An lm-eval model for ``model`` whose log-likelihoods use the chunked head where it applies."""
    from lm_eval.models.huggingface import HFLM

    class ChunkedHFLM(HFLM):  # type: ignore[misc]
        def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                                  disable_tqdm: bool = False, override_bs: int | None = None) -> list[tuple[float, bool]]:
            if self._llmprune_head is None or self.backend != "causal":
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            head = self._llmprune_head
            size = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 1)
            order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
            answers: list[tuple[float, bool] | None] = [None] * len(requests)
            with torch.no_grad():
                for first in range(0, len(order), size):
                    batch = order[first:first + size]
                    inps = []
                    for i in batch:
                        _, ctx, cont = requests[i]
                        if len(ctx) + len(cont) > self.max_length + 1:
                            log.warning("request of %d tokens truncated from the left to the model's %d",
                                        len(ctx) + len(cont), self.max_length)
                        inps.append((ctx + cont)[-(self.max_length + 1):][:-1])
                    width = max(len(x) for x in inps)
                    ids = torch.zeros((len(inps), width), dtype=torch.long, device=self.device)
                    for row, x in enumerate(inps):
                        ids[row, :len(x)] = torch.tensor(x, dtype=torch.long)
                    hidden = head.hidden(ids)
                    for row, i in enumerate(batch):
                        key, _, cont = requests[i]
                        end = len(inps[row])
                        answer = continuation_scores(head, hidden[row, end - len(cont):end], cont)
                        answers[i] = answer
                        if key is not None:
                            self.cache_hook.add_partial("loglikelihood", key, answer)
                    del hidden
            return answers  # type: ignore[return-value]

    lm = ChunkedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    vocab = model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    probe = (torch.arange(1, 17, device=device) % vocab).unsqueeze(0)
    lm._llmprune_head = chunked_head(model, probe)
    return lm
