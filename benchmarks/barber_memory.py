#!/usr/bin/env python3
"""Barber's peak memory at 7B widths: one model plus one layer, not two models (issue 3's goal).

On SmolLM2 (``unstructured.py``) Barber's extra memory over Wanda is dominated by calibration
activations (its hidden state is 576 wide, its weights 540 MB), which says little about a real model.
This benchmark measures it where weights dominate: a random-initialized LLaMA-2-7B layout
(``make_shaped_model.py``, bf16 shards) truncated to ``--layers`` decoder layers (the 7B widths:
each layer is 202M parameters, 0.40 GB in bf16; the embeddings and head 0.52 GB), Wanda and Barber
(its defaults: over Wanda, output granularity, ratio 0.01) at 50% with 8 x 512 C4 calibration tokens,
computed in bfloat16 on the CPU, each in its own process (its own peak RSS), loaded whole and
streamed (``--stream``: one layer at a time from the shards).

What the numbers mean: the reference implementation deep-copies the model, so it holds two models;
ours holds the model (or, streamed, one layer) plus the current layer's dense weights in float32 and
their float32 gradient statistics (two layers' worth in float32, i.e. four bf16 layers), plus
activations. ``extra_over_wanda_mb`` is that overhead, ``extra_over_wanda_layers`` the same in bf16
layers; a deep copy would add the whole checkpoint (``checkpoint_mb``).

    .venv/bin/python benchmarks/barber_memory.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers kept (the 7B widths)")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--modes", default="memory,stream", help="memory (whole model loaded), stream, or both")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llmprune-bench-barber"))
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "memory" / "barber_memory.json")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not set(modes) <= {"memory", "stream"}:
        parser.error(f"--modes: memory and/or stream, got {args.modes!r}")

    from make_shaped_model import make
    from provenance import CLI, child_env, provenance

    from llmprune.io.save import write_json_atomic

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.workdir / f"{args.shape}-{args.layers}layers"
    out = args.workdir / "pruned"
    try:
        made = make(args.shape, model, args.layers)
        config = json.loads((model / "config.json").read_text())
        layer_params = (4 * config["hidden_size"] ** 2
                        + 3 * config["hidden_size"] * config["intermediate_size"] + 2 * config["hidden_size"])
        runs: list[dict[str, Any]] = []
        for mode in modes:
            for method in ("wanda", "barber"):
                cmd = [*CLI, "prune", "--model", str(model), "--method", method, "--sparsity", "0.5",
                       "--dtype", args.dtype, "--calib-dataset", "c4", "--data-dir", args.data_dir,
                       "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--eval", "",
                       "--no-eval-dense", "--stream" if mode == "stream" else "--no-stream",
                       "--output", str(out), "--overwrite"]
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
                wall = time.perf_counter() - start
                if proc.returncode != 0:
                    raise SystemExit(f"{method} ({mode}) failed:\n{proc.stderr[-4000:]}")
                report = json.loads((out / "llmprune.json").read_text())
                runs.append({
                    "mode": mode, "method": method, "recipe_method": report["recipe"]["method"],
                    "peak_rss_mb": report["memory"]["peak_rss_mb"], "prune_s": report["timings"]["prune_s"],
                    "process_wall_s": round(wall, 1), "sparsity": report["sparsity"]["overall"],
                    "tokens_sha256": report["calibration"]["tokens_sha256"],
                })
                print(json.dumps(runs[-1]), flush=True)
                versions = report["versions"]
                shutil.rmtree(out, ignore_errors=True)
        if len({r["tokens_sha256"] for r in runs}) != 1:
            raise SystemExit("the runs saw different calibration tokens")
        layer_mb = layer_params * 2 / 2**20
        summary = {}
        for mode in modes:
            peak = {r["method"]: r["peak_rss_mb"] for r in runs if r["mode"] == mode}
            extra = peak["barber"] - peak["wanda"]
            summary[mode] = {"wanda_peak_rss_mb": peak["wanda"], "barber_peak_rss_mb": peak["barber"],
                             "extra_over_wanda_mb": round(extra, 1),
                             "extra_over_wanda_layers": round(extra / layer_mb, 2)}
        result = {
            "benchmark": "barber_memory",
            "protocol": f"Wanda and Barber (defaults) at 50% unstructured, C4 calibration {args.nsamples} x "
                        f"{args.seqlen} (local mirror, seed 0), {args.dtype} on the CPU, each run in its own "
                        f"process; random-initialized {args.shape} layout truncated to {args.layers} layers",
            "model": {"shape": args.shape, "layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
                      "intermediate_size": config["intermediate_size"], "checkpoint_mb": round(made["bytes"] / 2**20, 1),
                      "layer_params": layer_params, "layer_mb_bf16": round(layer_mb, 1)},
            "runs": runs,
            "summary": summary,
            **provenance("barber_memory.py", versions),
        }
        args.results.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.results, result)
        print(json.dumps(summary, indent=2))
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(model, ignore_errors=True)


if __name__ == "__main__":
    main()
