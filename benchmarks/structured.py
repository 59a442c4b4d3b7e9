#!/usr/bin/env python3
"""Structured MLP-channel pruning of SmolLM2-135M: CFSP (each fine-score form, with and without
width rounding) and the baselines magnitude-SP, Wanda-SP and FLAP at several ratios, with
perplexity, parameter counts and CPU (or GPU) speed, dense vs pruned, in one run.

Protocol (the issue's): calibration 32 x 2048 C4 tokens, seed 0, and, as CFSP does, WikiText-2
validation windows of 1024 tokens; WikiText-2 test perplexity at seqlen 2048 (first
``--eval-windows`` windows); ratios are fractions of MLP channels removed.

Every structured method here propagates the dense model (all statistics come from one pass of
the dense model) and scores channels from the same per-layer statistics, so the benchmark runs the
calibration pass ONCE per calibration set and then, for every (method, options, ratio), applies
that method's allocation and removal to a fresh copy of the dense model. This gives exactly what
``llmprune prune --method M --sparsity R`` gives (tests/test_structured.py checks the equivalence)
at a fraction of the cost.

Speed: prefill = one forward over a ``--prompt``-token prompt (tokens/s); decode = greedy
``generate`` of ``--new-tokens`` tokens after a 16-token prompt with the KV cache (tokens/s);
the median of ``--repeats`` runs, dense measured in the same process. Results go to JSON after
every row, so an interrupted run keeps what it measured (``--resume`` skips measured rows).

    .venv/bin/python benchmarks/structured.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from llmprune.data.sources import resolve  # noqa: E402
from llmprune.data.tokens import calibration_windows, evaluation_tokens, token_hash  # noqa: E402
from llmprune.engine.engine import run_layerwise  # noqa: E402
from llmprune.eval.perplexity import perplexity  # noqa: E402
from llmprune.io.save import write_json_atomic  # noqa: E402
from llmprune.methods import METHODS  # noqa: E402
from llmprune.models.loading import load_model, pick_device  # noqa: E402
from llmprune.models.view import model_view  # noqa: E402
from llmprune.report import param_count, peak_rss_mb, versions  # noqa: E402
from llmprune.sparsity.patterns import parse_pattern  # noqa: E402

# (method, options, calibration sets): "main" rows run on every set, the others on C4 only.
CONFIGS: list[tuple[str, dict[str, Any], str]] = [
    ("cfsp", {"score": "weight_aware", "normalize": "per_token"}, "main"),  # the default
    ("cfsp", {"score": "faithful", "normalize": "per_token"}, "main"),
    ("cfsp", {"score": "weight_aware", "normalize": "per_token", "round_to": 128}, "c4"),
    ("cfsp", {"score": "faithful", "normalize": "per_token", "round_to": 128}, "c4"),
    ("cfsp", {"score": "faithful", "normalize": "reference"}, "c4"),  # the released code exactly
    ("cfsp", {"score": "weight_aware", "normalize": "reference"}, "c4"),
    ("wanda-sp", {}, "main"),
    ("flap", {}, "main"),
    ("magnitude-sp", {}, "c4"),
    # beyond the reference: KV groups removed too (off by default)
    ("cfsp", {"score": "weight_aware", "normalize": "per_token", "attention": 0.2}, "attn"),
]
CALIB_SETS = {"c4": ("c4", 32, 2048), "wikitext2-val": ("wikitext2:validation", 32, 1024)}


def speed(model: Any, ids: torch.Tensor, prompt: int, new_tokens: int, repeats: int, device: torch.device) -> dict[str, Any]:
    model.to(device)
    x = ids[: prompt].unsqueeze(0).to(device)
    short = ids[:16].unsqueeze(0).to(device)
    prefill, decode = [], []
    with torch.no_grad():
        model(input_ids=x[:, :32], use_cache=False)  # warm-up
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(input_ids=x, use_cache=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            prefill.append(prompt / (time.perf_counter() - t))
            t = time.perf_counter()
            out = model.generate(input_ids=short, attention_mask=torch.ones_like(short), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            decode.append((out.shape[1] - short.shape[1]) / (time.perf_counter() - t))
    model.to("cpu")
    return {"prefill_tok_s": round(statistics.median(prefill), 2), "decode_tok_s": round(statistics.median(decode), 2),
            "prompt_tokens": prompt, "new_tokens": new_tokens, "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    ap.add_argument("--calib", default="c4,wikitext2-val", help=f"calibration sets: {', '.join(CALIB_SETS)}")
    ap.add_argument("--nsamples", type=int, default=None, help="override the calibration windows of every set")
    ap.add_argument("--seqlen", type=int, default=None, help="override the calibration seqlen of every set")
    ap.add_argument("--methods", default=None, help="only these methods (comma list)")
    ap.add_argument("--default-only", action="store_true", help="only the first row (CFSP's defaults)")
    ap.add_argument("--attention", action="store_true", help="also the rows with attention pruning on")
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "structured" / "structured.json"))
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()

    device = pick_device(args.device)
    out_path = Path(args.output)
    result: dict[str, Any] = {"runs": []}
    if args.resume and out_path.is_file():
        result = json.loads(out_path.read_text())
    def key(set_name: str, method: str, options: dict[str, Any], ratio: float) -> str:
        return json.dumps([set_name, method, options, ratio], sort_keys=True)

    # A measured row is skipped; with speed on, a row measured without speed only gets its speed added.
    rows = {key(r["calibration"]["set"], r["method"], r["options"], r["ratio"]): r for r in result["runs"]}

    dense, tok = load_model(args.model, "float32", "cpu")
    eval_ids = evaluation_tokens(tok, resolve("wikitext2", "evaluation", args.data_dir))
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = set(args.methods.split(",")) if args.methods else None
    result.update({
        "benchmark": "structured", "model": args.model, "device": str(device), "versions": versions(),
        "protocol": {"eval": {"dataset": "wikitext2:test", "seqlen": args.eval_seqlen, "windows": args.eval_windows},
                     "ratios_of": "MLP channels", "dtype": "float32",
                     "speed": {"prompt": args.prompt, "new_tokens": args.new_tokens, "repeats": args.repeats}},
    })

    def ppl(model: Any) -> float:
        return perplexity(model, eval_ids, seqlen=args.eval_seqlen, windows=args.eval_windows, device=device)["ppl"]

    def save() -> None:
        result["memory"] = {"peak_rss_mb": round(peak_rss_mb(), 1)}
        write_json_atomic(out_path, result)

    if "dense" not in result:
        t = time.perf_counter()
        result["dense"] = {"ppl": ppl(dense), "params": param_count(dense), "eval_s": round(time.perf_counter() - t, 1)}
        save()
    if not args.no_speed:
        result["dense"]["speed"] = speed(dense, eval_ids, args.prompt, args.new_tokens, args.repeats, device)
        save()
    print("dense", json.dumps(result["dense"]), flush=True)

    for set_name in args.calib.split(","):
        source_name, nsamples, seqlen = CALIB_SETS[set_name]
        nsamples, seqlen = args.nsamples or nsamples, args.seqlen or seqlen
        configs = CONFIGS[:1] if args.default_only else CONFIGS
        wanted = {"main", set_name} | ({"attn"} if args.attention and set_name == "c4" else set())
        todo = [(m, o, r) for m, o, scope in configs for r in ratios
                if scope in wanted and (methods is None or m in methods)
                and (key(set_name, m, o, r) not in rows or (not args.no_speed and "speed" not in rows[key(set_name, m, o, r)]))]
        if not todo:
            continue
        source = resolve(source_name, "calibration", args.data_dir)
        calib = calibration_windows(tok, source, nsamples, seqlen, 0)
        calib_info = {"set": set_name, **source.describe(), "nsamples": nsamples, "seqlen": seqlen, "seed": 0,
                      "tokens_sha256": token_hash(calib)}
        collector = METHODS.get("cfsp")(parse_pattern(None, 0.0), METHODS.get("cfsp").Options())
        work = copy.deepcopy(dense)
        t = time.perf_counter()
        run_layerwise(model_view(work), collector, calib, device=device)
        calib_s = time.perf_counter() - t
        del work
        print(f"calibration pass {set_name}: {calib_s:.1f}s", flush=True)
        for method, options, ratio in todo:
            cls = METHODS.get(method)
            inst = cls(parse_pattern(None, ratio), cls.Options(**options))
            model = copy.deepcopy(dense)
            view = model_view(model)
            inst.validate(view)
            inst.layer_stats = collector.layer_stats
            t = time.perf_counter()
            structure = inst.finalize(view)
            finalize_s = time.perf_counter() - t
            existing = rows.get(key(set_name, method, options, ratio))
            if existing is None:
                t = time.perf_counter()
                row: dict[str, Any] = {
                    "method": method, "options": options, "ratio": ratio, "calibration": calib_info,
                    "resolved_options": inst.options.model_dump(mode="json"),
                    "ppl": ppl(model),
                    "params": structure["params"], "mlp_channels": structure["mlp_channels"],
                    "timings": {"calibration_pass_s": round(calib_s, 2), "finalize_s": round(finalize_s, 3),
                                "prune_s": round(calib_s + finalize_s, 2), "eval_s": round(time.perf_counter() - t, 1)},
                }
                for extra in ("keep_fractions", "attention"):
                    if extra in structure:
                        row[extra] = structure[extra]
            else:
                row = existing
                assert row["params"]["pruned"] == structure["params"]["pruned"], "rebuilt model differs from the row"
            if not args.no_speed:
                row["speed"] = speed(model, eval_ids, args.prompt, args.new_tokens, args.repeats, device)
                ds = result["dense"]["speed"]
                row["speedup"] = {"prefill": round(row["speed"]["prefill_tok_s"] / ds["prefill_tok_s"], 3),
                                  "decode": round(row["speed"]["decode_tok_s"] / ds["decode_tok_s"], 3)}
            if existing is None:
                result["runs"].append(row)
            save()
            print(f"{set_name} {method} {options} {ratio}: ppl {row['ppl']:.3f} params {structure['params']['pruned']}"
                  + (f" speedup {row['speedup']}" if "speedup" in row else ""), flush=True)
            del model


if __name__ == "__main__":
    main()
