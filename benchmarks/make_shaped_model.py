#!/usr/bin/env python3
"""Write a random-initialized model of a real shape (LLaMA-2 7B / 13B layout) for memory and speed benchmarks.

Nothing is downloaded: the config is LLaMA-2's, the weights are random (normal, std 0.02; norms 1),
bf16 safetensors, one shard per decoder layer plus one for the embeddings, final norm and head,
written shard by shard so the whole model is never in memory (peak: one layer in float32). The
tokenizer is a byte-level BPE over the 256 bytes built offline (ids < 257 of the 32000-word
vocabulary are used). ``--layers N`` keeps only the first N decoder layers (same widths; the
config says N layers), for a quicker benchmark that is labelled as such.

    .venv/bin/python benchmarks/make_shaped_model.py --shape llama2-7b --output /tmp/llama2-7b-random
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from llmprune.models.byte_tokenizer import byte_level_tokenizer  # noqa: E402

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40),
}
COMMON = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, hidden_act="silu")


def _random(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights
        return torch.ones(shape, dtype=torch.bfloat16)
    return torch.randn(shape, generator=gen).mul_(0.02).to(torch.bfloat16)


def make(shape: str, output: Path, layers: int | None = None, seed: int = 0, **overrides: object) -> dict[str, object]:
    """Write the model; ``overrides`` change config fields (tests use it for a miniature of the layout)."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    if output.exists():
        raise SystemExit(f"{output} exists; choose another --output")
    spec = {**COMMON, **SHAPES[shape], **overrides}
    if layers is not None:
        spec["num_hidden_layers"] = layers
    config = LlamaConfig(**spec, dtype="bfloat16")
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    n = config.num_hidden_layers
    groups: list[list[str]] = [[k for k in shapes if not k.startswith("model.layers.")]]
    groups += [[k for k in shapes if k.startswith(f"model.layers.{i}.")] for i in range(n)]
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    start = time.perf_counter()
    for k, keys in enumerate(groups, start=1):
        name = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {key: _random(shapes[key], gen) for key in keys}
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(tmp)
    byte_level_tokenizer().save_pretrained(tmp)
    tmp.rename(output)
    return {"shape": shape, "layers": n, "bytes": total, "params": total // 2, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(make(args.shape, args.output, args.layers, args.seed)))


if __name__ == "__main__":
    main()
