#!/usr/bin/env python3
"""Each method's default against its ``faithful`` form (the released code's behaviour), side by side.

Protocol (small, so that every row is one run on two shared CPU cores): SmolLM2-135M in float32,
calibration = 16 random 512-token windows of C4 (seed 0, the local mirror), WikiText-2 test
perplexity at seqlen 1024 over the first 8 windows. Unstructured methods at 50% (Barber: the paper's
preset over Wanda, output granularity, ratio 0.01, score WD); structured methods remove 20% of the
MLP channels. Every row of one group runs in this one process on the same calibration tokens, and
the JSON is rewritten after every row (an interrupted run keeps what it measured).

One group, ``all``: every method at its default and with method.faithful=true, Barber's
method.order (reference vs layer, otherwise at our defaults) and Barber faithful.

    nice -n 10 .venv/bin/python benchmarks/faithful.py --group all   # -> results/faithful/faithful.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from provenance import provenance  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

import llmprune  # noqa: E402
from llmprune.io.save import write_json_atomic  # noqa: E402
from llmprune.report import versions  # noqa: E402

PROTOCOL = {"model": "smollm2-135m", "calib": {"dataset": "c4", "nsamples": 16, "seqlen": 512, "seed": 0},
            "eval": {"dataset": "wikitext2", "seqlen": 1024, "windows": 8}}
BARBER = {"init": "wanda", "granularity": "output", "ratio": 0.01, "score": "WD"}
FAST = [("wanda", 0.5, {}), ("sparsegpt", 0.5, {}), ("cfsp", 0.2, {}), ("flap", 0.2, {})]
GROUPS: dict[str, list[tuple[str, str, float, dict[str, Any]]]] = {  # (label, method, sparsity, options)
    # Barber's two orders (our other defaults), every method at its default and with
    # method.faithful=true, then Barber faithful (order=reference and the float32 swap count)
    "all": [("barber order=layer", "barber", 0.5, {**BARBER, "order": "layer"}),
            ("barber order=reference", "barber", 0.5, {**BARBER, "order": "reference"})]
    + [(f"{name} {tag}", name, sparsity, {**extra, **({"faithful": True} if tag == "faithful" else {})})
       for name, sparsity, extra in FAST for tag in ("default", "faithful")]
    + [("barber faithful", "barber", 0.5, {**BARBER, "faithful": True})],
}

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", choices=sorted(GROUPS), default="all")
    parser.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or REPO / "benchmarks" / "results" / "faithful" / "faithful.json"
    result: dict[str, Any] = {"protocol": PROTOCOL, "group": args.group, "rows": [],
                              "note": "other jobs shared the two CPU cores: timings are indicative"}
    cal, ev = PROTOCOL["calib"], PROTOCOL["eval"]
    for label, method, sparsity, options in GROUPS[args.group]:
        t0 = time.perf_counter()
        run = llmprune.prune(PROTOCOL["model"], method=method, sparsity=sparsity, method_options=options,
                             calib_dataset=cal["dataset"], nsamples=cal["nsamples"], seqlen=cal["seqlen"],
                             seed=cal["seed"], eval=ev["dataset"], eval_seqlen=ev["seqlen"],
                             eval_windows=ev["windows"], data_dir=args.data_dir)
        report = run.report
        row = {"label": label, "method": method, "options": report["recipe"]["method"],
               "perplexity": report["eval"][ev["dataset"]]["ppl"],
               "dense_perplexity": report.get("eval_dense", {}).get(ev["dataset"], {}).get("ppl"),
               "sparsity": report["sparsity"].get("overall"), "prune_s": report["timings"].get("prune_s"),
               "wall_s": round(time.perf_counter() - t0, 1)}
        if "structure" in report:
            row["mlp_widths"] = report["structure"]["mlp_channels"]["widths"]
        result["rows"].append(row)
        result["provenance"] = provenance("faithful.py", report.get("versions", versions()))
        write_json_atomic(out, result)
        print(f"{label}: ppl {row['perplexity']:.3f} ({row['wall_s']} s)", flush=True)


if __name__ == "__main__":
    main()
