#!/usr/bin/env python3
"""Recovery after structured pruning of SmolLM2-135M: IG-LoRA (importance-guided ranks) vs uniform LoRA
at equal trainable parameters, equal steps, the same data and seed.

Protocol: CFSP (defaults) removes ``--ratios`` of the MLP channels, calibrated on ``--calib-nsamples`` x
``--calib-seqlen`` C4 tokens (seed 0); each pruned model is then recovered once per ``--variants``
entry with ``llmprune.recover`` (the same code path as ``llmprune recover``): LoRA on every decoder
linear, ``--steps`` AdamW steps of ``--batch-size`` C4 windows of ``--seqlen`` tokens (the same
windows for every variant: the report's ``tokens_sha256`` proves it), rank budget ``--rank``.
Perplexity: WikiText-2 test, first ``--eval-windows`` windows of ``--eval-seqlen`` tokens, for the
dense model, the pruned model (``eval_before``) and each recovered model. ``recovered_share`` is
(pruned - recovered) / (pruned - dense).

Variants: ``uniform`` (rank R on every block), ``importance`` (IG-LoRA, ranks proportional to CFSP's
saved block importance, ``power`` 1), ``importance-sqrt`` (power 0.5: a softer allocation), ``removed``
(``--capacity removed``: ranks proportional to importance x the share of the block pruning removed).
Results go to JSON after every row; ``--resume`` skips measured rows.

    .venv/bin/python benchmarks/recovery.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import llmprune  # noqa: E402
from llmprune.data.sources import resolve  # noqa: E402
from llmprune.data.tokens import evaluation_tokens  # noqa: E402
from llmprune.eval.perplexity import perplexity  # noqa: E402
from llmprune.io.save import write_json_atomic  # noqa: E402
from llmprune.models.loading import load_model  # noqa: E402
from llmprune.report import param_count, peak_rss_mb, versions  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "uniform": {"capacity": "uniform"},
    "importance": {"capacity": "importance", "power": 1.0},
    "importance-sqrt": {"capacity": "importance", "power": 0.5},
    "removed": {"capacity": "removed", "power": 1.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--ratios", default="0.2,0.3")
    ap.add_argument("--variants", default="importance,uniform", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--calib-nsamples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-dataset", default="c4",
                    help="recovery training text: c4, wikitext2:validation (in-domain for the evaluation) or a file")
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--work", default=str(REPO / "runs" / "bench-recovery"), help="scratch folder for checkpoints")
    ap.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "recovery" / "recovery.json"))
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()

    out_path, work = Path(args.output), Path(args.work)
    result: dict[str, Any] = {"runs": []}
    if args.resume and out_path.is_file():
        result = json.loads(out_path.read_text())
    done = {(r["ratio"], r["variant"]) for r in result["runs"]}
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    # with --resume the earlier rows stay: keep every command and variant that produced rows
    commands = result.get("commands", [result["command"]] if "command" in result else []) + [" ".join(sys.argv)]
    known = (result.get("protocol") or {}).get("recover", {}).get("variants", {})
    result.pop("command", None)
    previous = result.get("protocol")
    result.update({
        "benchmark": "recovery", "model": args.model, "commands": commands, "versions": versions(),
        "protocol": {
            "prune": {"method": "cfsp (defaults)", "ratios_of": "MLP channels", "calib": "c4",
                      "nsamples": args.calib_nsamples, "seqlen": args.calib_seqlen, "seed": 0},
            "recover": {"steps": args.steps, "seqlen": args.seqlen, "batch_size": args.batch_size, "lr": args.lr,
                        "rank_budget": args.rank, "train_dataset": args.train_dataset, "seed": args.seed,
                        "targets": "every decoder linear", "alpha_per_rank": 2.0, "variants": {**known, **{v: VARIANTS[v] for v in variants}}},
            "eval": {"dataset": "wikitext2:test", "seqlen": args.eval_seqlen, "windows": args.eval_windows},
            "dtype": "float32",
        },
    })

    if previous is not None:  # a resumed file's rows must share everything but the variants
        def fixed(protocol: dict[str, Any]) -> dict[str, Any]:
            return {**protocol, "recover": {k: v for k, v in protocol["recover"].items() if k != "variants"}}
        if fixed(previous) != fixed(result["protocol"]):
            ap.error(f"--resume: {out_path} was written with another protocol; use its settings or another --output")
    work.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        result["memory"] = {"peak_rss_mb": round(peak_rss_mb(), 1)}
        write_json_atomic(out_path, result)

    if "dense" not in result:
        t = time.perf_counter()
        dense, tok = load_model(args.model, "float32", "cpu")
        ids = evaluation_tokens(tok, resolve("wikitext2", "evaluation", args.data_dir))
        res = perplexity(dense, ids, seqlen=args.eval_seqlen, windows=args.eval_windows)
        result["dense"] = {"ppl": res["ppl"], "params": param_count(dense), "eval_s": round(time.perf_counter() - t, 1)}
        del dense
        save()
    dense_ppl = result["dense"]["ppl"]

    for ratio in [float(r) for r in args.ratios.split(",")]:
        todo = [v for v in variants if (ratio, v) not in done]
        if not todo:
            continue
        pruned_dir = work / f"cfsp-{ratio}"
        t = time.perf_counter()
        pruned = llmprune.prune(args.model, method="cfsp", sparsity=ratio, calib_dataset="c4",
                                nsamples=args.calib_nsamples, seqlen=args.calib_seqlen, seed=0, eval=[],
                                data_dir=args.data_dir, output=str(pruned_dir), overwrite=True)
        prune_s = time.perf_counter() - t
        structure = pruned.report["structure"]
        del pruned
        for variant in todo:
            rec_dir = work / f"rec-{ratio}-{variant}"
            shutil.rmtree(rec_dir.parent / f"{rec_dir.name}.partial", ignore_errors=True)
            t = time.perf_counter()
            rec = llmprune.recover(pruned_dir, output=rec_dir, overwrite=True, steps=args.steps, seqlen=args.seqlen,
                                   batch_size=args.batch_size, lr=args.lr, rank=args.rank, seed=args.seed,
                                   train_dataset=args.train_dataset, data_dir=args.data_dir, eval="wikitext2",
                                   eval_seqlen=args.eval_seqlen, eval_windows=args.eval_windows,
                                   checkpoint_every=0, **VARIANTS[variant])
            wall = time.perf_counter() - t
            rep, r = rec.report, rec.report["recovery"]
            before, after = rep["eval_before"]["wikitext2"]["ppl"], rep["eval"]["wikitext2"]["ppl"]
            result["runs"].append({
                "ratio": ratio, "variant": variant, **VARIANTS[variant],
                "ppl": {"dense": dense_ppl, "pruned": before, "recovered": after},
                "recovered_share": (before - after) / (before - dense_ppl),
                "trainable_params": r["trainable_params"], "uniform_budget": r["uniform_budget"],
                "ranks": r["ranks"], "block_importance": (r["importance"] or {}).get("values"),
                "removed_share": (r["importance"] or {}).get("removed_share"),
                "mlp_widths": structure["mlp_channels"]["widths"],
                "params_pruned": structure["params"]["pruned"],
                "loss": {k: v for k, v in r["loss"].items() if k != "curve"}, "loss_curve": r["loss"]["curve"],
                "train_tokens_sha256": r["data"]["tokens_sha256"], "merge": r["merge"],
                "timings": {"prune_s": round(prune_s, 1), "recover_wall_s": round(wall, 1), **rep["timings"]},
            })
            print(f"ratio {ratio} {variant}: dense {dense_ppl:.3f} pruned {before:.3f} -> {after:.3f} "
                  f"(share {result['runs'][-1]['recovered_share']:.3f}, {r['trainable_params']:,} params, "
                  f"{wall:.0f} s)", flush=True)
            del rec
            shutil.rmtree(rec_dir, ignore_errors=True)
            save()
        shutil.rmtree(pruned_dir, ignore_errors=True)
    save()


if __name__ == "__main__":
    main()
