"""A real Hugging Face fast tokenizer over the 256 byte values (plus ``<eos>``), built offline.

For random-initialized models that need a tokenizer but no vocabulary of their own: the
real-shape models of ``benchmarks/make_shaped_model.py`` and the tiny models of the tests.
"""

from __future__ import annotations

from typing import Any


def byte_level_tokenizer() -> Any:
    """One id per byte (0-255) and ``<eos>`` = 256; no network, no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's printable stand-ins for the 256 byte values (the ByteLevel pre-tokenizer emits these).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    vocab = {chars[b]: b for b in range(256)}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
