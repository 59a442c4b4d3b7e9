#!/usr/bin/env python3
"""Streaming prune of a 7B-shaped model on this machine: peak RSS, wall time, and the forward-pass floor.

Protocol (issue 6): a random-initialized LLaMA-2-7B layout (``make_shaped_model.py``, bf16 shards),
Wanda 50% with 8 x 512 calibration tokens of C4 (local mirror), computed in bfloat16 on the CPU,
``--stream``. Two processes, each with its own peak RSS:

* prune: ``llmprune prune --stream`` (the CLI), timed by its own ``timings.prune_s`` (embeddings
  and head loaded and written, every layer read, observed, pruned, propagated and written, the
  activations saved after every layer) and by the wall clock around the whole process;
* floor: one plain forward pass of the same calibration tokens, streamed the same way (layers read
  from the shards one at a time by the same store, one forward per layer, nothing written). A
  layer-wise method cannot be faster than this. Wanda as published needs two forwards per layer
  (statistics of the dense layer, then the pruned layer's outputs for the next layer; the first
  stops before the down projection), so with ``method.sequential=layer`` its ratio stays well above
  1.5 wherever compute dominates; ``method.sequential=linear`` prunes inside the one forward.

``--layers N`` uses the 7B widths with only N decoder layers (labelled in the JSON). The model and
the pruned output are deleted afterwards unless ``--keep``.

    .venv/bin/python benchmarks/streaming.py --data-dir ../shared/data
    .venv/bin/python benchmarks/streaming.py --data-dir ../shared/data --model /tmp/llama2-7b --keep
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


def floor(model: Path, data_dir: str, nsamples: int, seqlen: int, dtype_name: str, work: Path) -> dict[str, Any]:
    """One streamed forward pass of the calibration tokens (run in its own process by ``--floor``)."""
    import torch
    from transformers import AutoTokenizer

    from llmprune.data.sources import resolve
    from llmprune.data.tokens import calibration_windows, token_hash
    from llmprune.engine.engine import run_layerwise
    from llmprune.engine.streaming import StreamingStore
    from llmprune.methods.base import Method
    from llmprune.models.loading import pick_dtype
    from llmprune.models.shards import ShardReader, assign_tensors, empty_model
    from llmprune.models.view import model_view
    from llmprune.report import peak_rss_mb
    from llmprune.sparsity.patterns import Pattern

    class Forward(Method):
        """Nothing observed, nothing pruned: the engine runs each layer's forward once."""

        name = "forward"
        summary = "benchmark floor"
        stats = None

        def prune_layer(self, ctx: Any) -> dict[str, Any]:
            return {}

    class ReadOnly(StreamingStore):
        def done(self, layer: Any, report: dict[str, Any], hidden: Any) -> Any:
            return hidden

    dtype = pick_dtype(dtype_name, torch.device("cpu"))
    tok = AutoTokenizer.from_pretrained(str(model))
    ids = calibration_windows(tok, resolve("c4", "calibration", data_dir), nsamples, seqlen, 0)
    reader = ShardReader.open(model)
    net = empty_model(model, dtype)
    view = model_view(net)
    store = ReadOnly(view, reader, work, "floor", dtype, None)
    t0 = time.perf_counter()
    outside = [k for k in reader.tensors if not k.startswith(f"{view.layers_path}.")]
    assign_tensors(net, reader.load(outside), dtype)
    run_layerwise(view, Forward(Pattern(0.0), Method.Options()), ids, device=torch.device("cpu"),
                  cache_device=torch.device("cpu"), store=store)
    return {"forward_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            "tokens_sha256": token_hash(ids)}


def _child(cmd: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    from provenance import child_env

    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return proc, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", type=Path, help="an existing shaped model (default: write one, then delete it)")
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--layers", type=int, default=None, help="only the first N decoder layers (labelled)")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llmprune-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the model and the pruned output")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "streaming" / "streaming.json")
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)  # internal: the floor process
    args = parser.parse_args()

    if args.floor:
        print(json.dumps(floor(args.model, args.data_dir, args.nsamples, args.seqlen, args.dtype,
                               args.workdir / "floor-work")))
        return

    from make_shaped_model import make
    from provenance import CLI, provenance

    from llmprune.io.save import write_json_atomic
    from llmprune.models.shards import ShardReader

    args.workdir.mkdir(parents=True, exist_ok=True)
    made = args.model is None
    model = args.model or args.workdir / f"{args.shape}{'' if args.layers is None else f'-{args.layers}layers'}"
    out = args.workdir / "pruned"
    try:
        if made:
            print(json.dumps(make(args.shape, model, args.layers)), flush=True)
        reader = ShardReader.open(model)
        config = json.loads((model / "config.json").read_text())
        runs = {}
        for sequential in ("layer", "linear"):
            _, wall = _child([*CLI, "prune", "--model", str(model), "--method", "wanda", "--sparsity", "0.5",
                              "--stream", "--dtype", args.dtype, "--calib-dataset", "c4", "--data-dir", args.data_dir,
                              "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--no-eval-dense",
                              "--set", f"method.sequential={sequential}", "--output", str(out), "--overwrite"])
            report = json.loads((out / "llmprune.json").read_text())
            runs[sequential] = {
                "prune_s": report["timings"]["prune_s"], "total_s": report["timings"]["total_s"],
                "process_wall_s": round(wall, 1), "layer_steps_s": round(sum(r["time_s"] for r in report["layers"]), 1),
                "peak_rss_mb": report["memory"]["peak_rss_mb"], "sparsity": report["sparsity"]["overall"],
                "output_bytes": sum(p.stat().st_size for p in out.iterdir()),
                "tokens_sha256": report["calibration"]["tokens_sha256"],
            }
            shutil.rmtree(out, ignore_errors=True)
        fl, floor_wall = _child([sys.executable, __file__, "--floor", "--model", str(model), "--data-dir", args.data_dir,
                                 "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--dtype", args.dtype,
                                 "--workdir", str(args.workdir)])
        floor_rep = json.loads(fl.stdout.strip().splitlines()[-1])
        if any(r.pop("tokens_sha256") != floor_rep["tokens_sha256"] for r in runs.values()):
            raise SystemExit("the floor pass and the prune saw different calibration tokens")
        forward_s = floor_rep["forward_s"]
        result = {
            "protocol": "Wanda 50% unstructured, --stream, C4 calibration (local mirror), random-initialized "
                        "LLaMA-2 layout in bf16 shards, computed in bfloat16 on the CPU; run twice: "
                        "method.sequential=layer (the papers' protocol: a statistics pass, then the pruned "
                        "layer's forward) and method.sequential=linear (each linear pruned inside the layer's "
                        "one forward, all windows in one batch)",
            "model": {"shape": args.shape, "layers": config["num_hidden_layers"],
                      "truncated": args.layers is not None, "hidden_size": config["hidden_size"],
                      "checkpoint_bytes": sum(reader.fingerprint()["files"].values()),
                      "params": sum(t.numel for t in reader.tensors.values())},
            "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen,
                            "tokens_sha256": floor_rep["tokens_sha256"]},
            "prune": runs["layer"],
            "prune_sequential_linear": runs["linear"],
            "floor": {**{k: v for k, v in floor_rep.items() if k != "tokens_sha256"},
                      "process_wall_s": round(floor_wall, 1)},
            "prune_over_floor": round(runs["layer"]["prune_s"] / forward_s, 3),
            "prune_sequential_linear_over_floor": round(runs["linear"]["prune_s"] / forward_s, 3),
            "goals": {
                "peak_rss_at_most_4gb": all(r["peak_rss_mb"] <= 4096 for r in runs.values()),
                "prune_at_most_1.5x_floor": runs["layer"]["prune_s"] <= 1.5 * forward_s,
                "prune_sequential_linear_at_most_1.5x_floor": runs["linear"]["prune_s"] <= 1.5 * forward_s,
            },
            **provenance("streaming.py", report["versions"]),
        }
        args.results.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.results, result)
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(args.workdir / "floor-work", ignore_errors=True)
            if made:
                shutil.rmtree(model, ignore_errors=True)


if __name__ == "__main__":
    main()
