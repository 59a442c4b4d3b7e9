#!/usr/bin/env python3
"""Pruned SmolLM2-135M in llama.cpp: speed, size and perplexity of GGUF exports, dense vs pruned.

Variants: dense; CFSP at 10/20/30/50% of MLP channels with per-layer widths (exported as llama.cpp's
``deci`` architecture, every layer at its own width); CFSP 30% and 50% with uniform widths
(``--set method.uniform=true``, a stock ``llama`` GGUF); Wanda 50% (unstructured). Each at f16 and
q4_k_m (llama.cpp's quantizer; Wanda's q4_k_m with ``allow_fill``, the zeros it fills in recorded).

In llama.cpp (llama-cpp-python, ``--threads`` threads), all variants in one process:
- prefill tokens/s: one ``eval`` of a ``--prefill``-token WikiText-2 prompt (batch = prompt);
- decode tokens/s: ``--decode`` single-token steps after a 16-token prompt (KV cache);
  median of ``--repeats`` rounds, each round measuring every file once, after all files are written;
- file size, and weight bytes read per decoded token (every tensor of the file but the token
  embedding, which a decode step reads one row of; a tied output matrix is the embedding, read
  whole); the ideal decode speed-up is dense bytes / pruned bytes;
- WikiText-2 test perplexity through llama.cpp (``--eval-windows`` windows of ``--eval-seqlen``
  tokens, the same windows and token ids as PyTorch), beside PyTorch float32's.

    .venv/bin/python benchmarks/deploy.py --data-dir ../shared/data   # alone: the speed rows are timings
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

VARIANTS: dict[str, dict[str, Any]] = {
    "dense": {},
    "cfsp10": {"method": "cfsp", "sparsity": 0.1},
    "cfsp20": {"method": "cfsp", "sparsity": 0.2},
    "cfsp30": {"method": "cfsp", "sparsity": 0.3},
    "cfsp50": {"method": "cfsp", "sparsity": 0.5},
    "cfsp30_uniform": {"method": "cfsp", "sparsity": 0.3, "method_options": {"uniform": True}},
    "cfsp50_uniform": {"method": "cfsp", "sparsity": 0.5, "method_options": {"uniform": True}},
    "wanda50": {"method": "wanda", "sparsity": 0.5},
    # widths rounded to llama.cpp's block sizes (k-quants: 256, q5_0/q8_0: 32), so no tensor falls back
    "cfsp30_round32": {"method": "cfsp", "sparsity": 0.3, "method_options": {"round_to": 32}},
    "cfsp30_round256": {"method": "cfsp", "sparsity": 0.3, "method_options": {"round_to": 256}},
}
DEFAULT_VARIANTS = ("dense", "cfsp10", "cfsp20", "cfsp30", "cfsp50", "cfsp30_uniform", "cfsp50_uniform", "cfsp30_round256",
                    "wanda50")
TYPES = ("f16", "q4_k_m")


def weight_bytes_per_token(path: Path) -> int:
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    tied = "output.weight" not in tensors
    return sum(n for name, n in tensors.items() if name != "token_embd.weight" or tied)


def llama_ppl(llm: Any, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        scores = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        m = scores.max(-1, keepdims=True)
        logp = scores - m - np.log(np.exp(scores - m).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return math.exp(nll / count)


def torch_ppl(model: Any, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            t = torch.tensor([ids])
            logp = torch.log_softmax(model(input_ids=t).logits[0].float(), -1)
            nll -= float(logp[torch.arange(len(ids) - 1), t[0, 1:]].sum())
            count += len(ids) - 1
    return math.exp(nll / count)


def speed(path: Path, prompt: list[int], decode: int, repeats: int, threads: int) -> dict[str, Any]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(prompt) + decode + 32, n_batch=len(prompt), n_threads=threads,
                n_threads_batch=threads, verbose=False)
    prefill, dec = [], []
    llm.eval(prompt[:32])  # warm-up
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        prefill.append(len(prompt) / (time.perf_counter() - t0))
        llm.reset()
        llm.eval(prompt[:16])
        t0 = time.perf_counter()
        for _ in range(decode):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        dec.append(decode / (time.perf_counter() - t0))
    llm.close()
    return {"prefill_tok_s": round(statistics.median(prefill), 2), "decode_tok_s": round(statistics.median(dec), 2),
            "prefill_runs": [round(x, 2) for x in prefill], "decode_runs": [round(x, 2) for x in dec]}


def markdown(out: dict[str, Any]) -> str:
    """The table docs/deployment.md shows."""
    lines = ["| variant | type | arch | file MB | prefill tok/s | decode tok/s | decode x (ideal x) | prefill x "
             "| ppl llama.cpp | ppl PyTorch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in out["results"].items():
        for qtype, e in row["types"].items():
            lines.append(f"| {name} | {qtype} | {e['arch']} | {e['file_bytes'] / 1e6:.0f} | {e['prefill_tok_s']:.0f} | "
                         f"{e['decode_tok_s']:.1f} | {e.get('decode_speedup', 1):.2f} ({e.get('ideal_decode_speedup', 1):.2f})"
                         f" | {e.get('prefill_speedup', 1):.2f} | {e['ppl_llama_cpp']:.2f} | {row['ppl_pytorch_f32']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR"))
    ap.add_argument("--work", default=str(REPO / "runs" / "deploy-bench"), help="run folders and GGUF files")
    ap.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "deploy" / "deploy.json"))
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=4)
    args = ap.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    import llmprune
    from llmprune.data.sources import resolve
    from llmprune.data.tokens import evaluation_tokens
    from llmprune.report import versions

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    _, tok = llmprune.load("smollm2-135m", dtype="float32")
    stream = evaluation_tokens(tok, resolve("wikitext2", "evaluation", args.data_dir)).tolist()
    windows = [stream[i * args.eval_seqlen:(i + 1) * args.eval_seqlen] for i in range(args.eval_windows)]
    prompt = stream[-args.prefill:]
    rows: dict[str, Any] = {}
    files: list[tuple[str, str, Path]] = []
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    # phase 1: prune, export, perplexity in PyTorch and in llama.cpp (exact, not timing-sensitive)
    for name in args.variants.split(","):
        spec = VARIANTS[name]
        run = work / name
        t0 = time.perf_counter()
        if spec:
            llmprune.prune("smollm2-135m", calib_dataset="c4", data_dir=args.data_dir, nsamples=args.nsamples,
                           seqlen=args.seqlen, seed=0, output=str(run), overwrite=True, **spec)
            source = str(run)
        else:
            source = "smollm2-135m"
        model = llmprune.load(source, dtype="float32")[0]
        row: dict[str, Any] = {"prune_s": round(time.perf_counter() - t0, 1),
                               "ppl_pytorch_f32": round(torch_ppl(model, windows), 4), "types": {}}
        del model
        for qtype in TYPES:
            path = work / f"{name}-{qtype}.gguf"
            res = llmprune.export(source, path, type=qtype, overwrite=True, allow_fill=True)
            ppl_llm = Llama(model_path=str(path), n_ctx=args.eval_seqlen, n_batch=args.eval_seqlen,
                            n_threads=args.threads, logits_all=True, verbose=False)
            entry = {"arch": res.arch, "mlp_widths": res.mlp_widths, "padded": res.padded,
                     "file_bytes": path.stat().st_size, "weight_bytes_per_token": weight_bytes_per_token(path),
                     "zeros_filled": res.zeros_filled, "ppl_llama_cpp": round(llama_ppl(ppl_llm, windows), 4),
                     "prefill_runs": [], "decode_runs": []}
            ppl_llm.close()
            row["types"][qtype] = entry
            files.append((name, qtype, path))
            print(name, qtype, {k: v for k, v in entry.items() if k != "mlp_widths"}, flush=True)
        rows[name] = row
    # phase 2: speed, in rounds over every file, so that a disturbance of the machine spreads over all
    # variants instead of falling on one (each round measures every file once; median over rounds)
    load_speed = os.getloadavg()
    for r in range(args.repeats):
        for name, qtype, path in files:
            e = rows[name]["types"][qtype]
            s = speed(path, prompt, args.decode, 1, args.threads)
            e["prefill_runs"] += s["prefill_runs"]
            e["decode_runs"] += s["decode_runs"]
            print(f"round {r + 1}/{args.repeats}", name, qtype, s["prefill_runs"], s["decode_runs"], flush=True)
    for row in rows.values():
        for e in row["types"].values():
            e["prefill_tok_s"] = round(statistics.median(e["prefill_runs"]), 2)
            e["decode_tok_s"] = round(statistics.median(e["decode_runs"]), 2)
    dense = rows.get("dense")
    if dense:
        for row in rows.values():
            for qtype, e in row["types"].items():
                d = dense["types"][qtype]
                e["ideal_decode_speedup"] = round(d["weight_bytes_per_token"] / e["weight_bytes_per_token"], 4)
                e["decode_speedup"] = round(e["decode_tok_s"] / d["decode_tok_s"], 4)
                e["decode_vs_ideal"] = round(e["decode_speedup"] / e["ideal_decode_speedup"], 4)
                e["prefill_speedup"] = round(e["prefill_tok_s"] / d["prefill_tok_s"], 4)
            row["ppl_gap_f16_vs_pytorch"] = round(row["types"]["f16"]["ppl_llama_cpp"] / row["ppl_pytorch_f32"] - 1, 5)
    out = {
        "benchmark": "deploy: pruned SmolLM2-135M exported to GGUF and run in llama.cpp",
        "protocol": {k: v for k, v in vars(args).items() if k not in ("work", "output")} | {
            "calibration": "c4 (local mirror), seed 0", "eval": "wikitext2 test, first windows",
            "speed": "median of repeats; prefill = one eval of the prompt, decode = single-token evals after 16"},
        "note": ("speed is measured after every file is written, in rounds over all files (median over rounds), "
                 "so that a disturbance of the machine spreads over the variants; the load averages say how busy "
                 "the machine was"),
        "variants": {k: VARIANTS[k] for k in rows},
        "results": rows,
        "total_s": round(time.perf_counter() - t_start, 1),
        "versions": versions() | {"llama_cpp_python": llama_cpp.__version__},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_at_start": load_start,
                    "load_average_before_speed": load_speed, "load_average_at_end": os.getloadavg()},
        "command": " ".join(["benchmarks/deploy.py", *sys.argv[1:]]),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(markdown(out))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
