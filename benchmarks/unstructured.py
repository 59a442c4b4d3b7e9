#!/usr/bin/env python3
"""Unstructured and N:M pruning of SmolLM2-135M: llmprune vs llm-compressor, side by side, one run.

Protocol (the issue's): calibration = 32 random 2048-token windows of C4 (seed 0; the local mirror's
C4 documents 0-499), WikiText-2 test perplexity at seqlen 2048 over the first 32 windows
(``--all-windows`` for all), 50% unstructured and 2:4, float32 on this CPU.

Each pruning run is its own process, so its peak RSS is its own; llmprune is timed around its
layer-wise loop (``timings.prune_s``) and llm-compressor around its ``oneshot`` call, both after the
model is loaded. Both receive the very same calibration tokens (checked by hash), and every pruned
model is evaluated here by the same function. Results are written to JSON after every run, so an
interrupted benchmark keeps what it measured.

    .venv/bin/python benchmarks/unstructured.py                # ours + peer if .venv-peer exists
    .venv/bin/python benchmarks/unstructured.py --no-peer --methods wanda --patterns 2:4
    bash benchmarks/setup_peer.sh                              # once, to enable the peer
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from llmprune.data.sources import resolve  # noqa: E402
from llmprune.data.tokens import calibration_windows, evaluation_tokens, token_hash  # noqa: E402
from llmprune.eval.perplexity import perplexity  # noqa: E402
from llmprune.io.save import write_json_atomic  # noqa: E402
from llmprune.methods import METHODS  # noqa: E402
from llmprune.models.loading import gguf_to_folder, load_model, resolve_source  # noqa: E402
from llmprune.report import versions  # noqa: E402

BARBER_EXTRAS: dict[str, list[dict[str, Any]]] = {  # beyond the presets, per pattern kind ("unstructured", "nm")
    # SparseGPT's reconstruction retained for the weights it kept
    "unstructured": [{"init": "sparsegpt", "granularity": "layer", "ratio": 0.1, "retain_reconstruction": True},
                     {"init": "wanda", "granularity": "output", "ratio": 0.1}],
    "nm": [{"init": "sparsegpt", "granularity": "layer", "ratio": 0.1, "retain_reconstruction": True},
           {"init": "wanda", "granularity": "output", "ratio": 0.1},
           # the paired N:M rule (every swap raises the score inside its M-group)
           {"init": "wanda", "granularity": "output", "ratio": 0.1, "nm_rule": "paired"},
           {"init": "sparsegpt", "granularity": "layer", "ratio": 0.1, "retain_reconstruction": True,
            "nm_rule": "paired"},
           # the presets' coarse granularities with the paired rule
           {"init": "sparsegpt", "granularity": "layer", "ratio": 0.1, "nm_rule": "paired"},
           {"init": "magnitude", "granularity": "block", "ratio": 0.1, "nm_rule": "paired"}],
}
BARBER_RECONSTRUCT: dict[str, list[dict[str, Any]]] = {  # the reconstruct extension (OBS re-solve of the rebuilt mask)
    "unstructured": [{"init": "sparsegpt", "granularity": "layer", "ratio": 0.1, "reconstruct": True},
                     {"init": "wanda", "granularity": "output", "ratio": 0.1, "reconstruct": True}],
    "nm": [{"init": "sparsegpt", "granularity": "output", "ratio": 0.01, "nm_rule": "paired", "reconstruct": True},
           {"init": "wanda", "granularity": "output", "ratio": 0.01, "nm_rule": "paired", "reconstruct": True}],
}
BARBER_EXACT: dict[str, list[dict[str, Any]]] = {  # the reconstruct runs with the exact row-wise solver; last,
    # ratio 0: the initializer's own mask with exactly re-solved weights (what the solver alone gives)
    kind: [{**o, "reconstruct_solver": "exact"} for o in runs]
    + [{**runs[0], "ratio": 0.0, "reconstruct_solver": "exact"}]
    for kind, runs in BARBER_RECONSTRUCT.items()
}
SWEEP_GRANULARITIES = ("output", "layer", "block", "input")  # --barber-sweep's cells, in the order run
SWEEP_RATIOS = (0.001, 0.01, 0.05, 0.1)
BARBER_PRESETS = {  # LLM-Barber's reference hyper-parameters per initializer
    "magnitude": {"granularity": "block", "ratio": 0.1},
    "wanda": {"granularity": "output", "ratio": 0.01},
    "sparsegpt": {"granularity": "layer", "ratio": 0.1},
}


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd``; return the CPU seconds (user + system) it used, a measure that other jobs on the
    machine inflate far less than wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w") as fh:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO / "src")}
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)


def run_key(tool: str, method: str, pattern: str, options: dict[str, Any], target: float) -> str:
    return json.dumps([tool, method, pattern, options, round(target, 6)], sort_keys=True)


def target_of(args: argparse.Namespace, pattern: str, target: float | None = None) -> float:
    """The sparsity a run asks for: ``target`` (one of --sparsities) for unstructured, 1 - N/M for N:M."""
    if pattern == "unstructured":
        return float(target if target is not None else args.sparsity)
    n, m = (int(x) for x in pattern.split(":"))
    return 1 - n / m


def tag_of(tool: str, method: str, pattern: str, target: float, options: dict[str, Any]) -> str:
    kind = f"unstructured{round(target * 100)}" if pattern == "unstructured" else pattern.replace(":", "of")
    return f"{tool}-{method}-{kind}" + "".join(f"-{k}{v}" for k, v in options.items())


def ours(args: argparse.Namespace, work: Path, method: str, pattern: str, options: dict[str, Any],
         target: float | None = None) -> dict[str, Any]:
    target = target_of(args, pattern, target)
    tag = tag_of("llmprune", method, pattern, target, options)
    out = work / tag
    cmd = [sys.executable, "-m", "llmprune.cli", "prune", "--model", args.model, "--method", method,
           "--calib-dataset", "c4", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.calib_seed),
           "--data-dir", args.data_dir, "--output", str(out), "--overwrite"]
    cmd += ["--pattern", pattern] if pattern != "unstructured" else ["--sparsity", str(target)]
    for key, value in options.items():
        cmd += ["--set", f"method.{key}={value}"]
    cpu_s = run(cmd, work / f"{tag}.log")
    rep = json.loads((out / "llmprune.json").read_text())
    return {"tool": "llmprune", "method": method, "pattern": pattern, "target": target, "request": options,
            "options": rep["recipe"]["method"], "allocation": rep.get("allocation"),
            "prune_s": rep["timings"]["prune_s"], "process_cpu_s": cpu_s, "peak_rss_mb": rep["memory"]["peak_rss_mb"],
            "sparsity": rep["sparsity"]["overall"], "nm_valid": rep["sparsity"].get("nm_valid"),
            "calib_hash": rep["calibration"].get("tokens_sha256") if rep["calibration"] else None,
            "layers": [{k: v for k, v in layer.items() if k != "sparsity"} for layer in rep["layers"]]
            if method == "barber" else None, "folder": str(out)}


def peer(args: argparse.Namespace, work: Path, method: str, pattern: str, calib_file: Path, model_dir: Path,
         request: dict[str, Any] | None = None, target: float | None = None) -> dict[str, Any]:
    """An llm-compressor run; ``request`` {"profile": "owl"} asks for its OWL allocation (with --owl-m/--owl-lambda)."""
    request = request or {}
    target = target_of(args, pattern, target)
    tag = tag_of("llmcompressor", method, pattern, target, request)
    out, js = work / tag, work / f"{tag}.json"
    cmd = [str(args.peer_python), str(REPO / "benchmarks" / "peer_llmcompressor.py"), "--model", str(model_dir),
           "--calib", str(calib_file), "--method", method, "--sparsity", str(target), "--pattern", pattern,
           "--output", str(out), "--json", str(js)]
    if request.get("profile") == "owl":
        cmd += ["--profile", "owl", "--owl-m", str(args.owl_m), "--owl-lambda", str(args.owl_lambda)]
    cpu_s = run(cmd, work / f"{tag}.log")
    rep = json.loads(js.read_text())
    return {"tool": "llmcompressor", "method": method, "pattern": pattern, "target": target, "request": request,
            "options": rep.get("modifier_args"), "layer_zero_fractions": rep.get("layer_zero_fractions"),
            "prune_s": rep["prune_seconds"], "process_cpu_s": cpu_s, "peak_rss_mb": rep["peak_rss_mb"], "sparsity": rep.get("zero_fraction"),
            "versions": {k: v for k, v in rep.items() if k.endswith("version") or k == "versions"}, "folder": str(out),
            **({"owl_workaround": rep["owl_workaround"]} if rep.get("owl_workaround") else {})}


def refuse_resume(output: Path, what: str) -> None:
    """Rows of another protocol or processor (CPUs with other vector units round differently) would not
    compare with new ones: refuse, rather than mix them or overwrite the file."""
    raise SystemExit(f"--resume: {output} was written with another {what}; its rows would not compare with this "
                     f"run's. Give another --output, or drop --resume to start a new file.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (up to 128)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration windows (both tools get the same)")
    ap.add_argument("--sparsity", type=float, default=0.5, help="unstructured target (one; see --sparsities)")
    ap.add_argument("--sparsities", default=None, help="unstructured targets, comma-separated (default: --sparsity)")
    ap.add_argument("--allocations", default="uniform",
                    help="layer-wise allocation of our unstructured runs: uniform, owl (comma-separated; N:M: uniform)")
    ap.add_argument("--reconstructs", default="none",
                    help="our wanda/magnitude/sparsegpt runs: none, obs, exact (method.reconstruct with that solver; "
                         "sparsegpt: exact only), comma-separated")
    ap.add_argument("--peer-profiles", default="uniform", help="llm-compressor's sparsity_profile: uniform, owl")
    ap.add_argument("--owl-m", type=float, default=5.0, help="OWL's outlier threshold M (both tools)")
    ap.add_argument("--owl-lambda", type=float, default=0.08, help="OWL's lambda (both tools)")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--all-windows", action="store_true")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt,barber")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--barber-sweep", action="store_true", help="also sweep Barber ratio and granularity on Wanda")
    ap.add_argument("--barber-configs", default="presets,extras",
                    help="which Barber runs: presets (the paper's, per initializer), extras (other rules and "
                         "retained reconstruction), reconstruct (the reconstruct extension), exact (reconstruct with "
                         "the exact row-wise solver)")
    ap.add_argument("--sweep-granularities", default=",".join(SWEEP_GRANULARITIES),
                    help="only these granularities of --barber-sweep (comma-separated), e.g. to finish a sweep "
                         "on another machine, where --resume is refused")
    ap.add_argument("--sweep-ratios", default=",".join(map(str, SWEEP_RATIOS)),
                    help="only these ratios of --barber-sweep (comma-separated, from the sweep's own)")
    ap.add_argument("--barber-inits", default="magnitude,wanda,sparsegpt",
                    help="only the Barber runs over these initializers (comma-separated; the sweep is over Wanda)")
    ap.add_argument("--barber-ratios", default=None,
                    help="only the Barber runs (presets, extras, reconstruct, exact) with these ratios (comma-separated)")
    ap.add_argument("--peer-methods", default="wanda,sparsegpt", help="llm-compressor runs beside ours")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-python", type=Path, default=REPO / ".venv-peer" / "bin" / "python")
    ap.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "unstructured" / "unstructured.json")
    ap.add_argument("--workdir", type=Path, default=None, help="where pruned models go (default: a temp dir)")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --output (same protocol) and do the rest")
    args = ap.parse_args()
    windows = None if args.all_windows else args.eval_windows
    for flag, value, known in (("--methods", args.methods, set(METHODS.names())),
                               ("--barber-configs", args.barber_configs, {"presets", "extras", "reconstruct", "exact"}),
                               ("--barber-inits", args.barber_inits, set(BARBER_PRESETS)),
                               ("--peer-methods", args.peer_methods, {"wanda", "sparsegpt"}),
                               ("--sweep-granularities", args.sweep_granularities, set(SWEEP_GRANULARITIES)),
                               ("--sweep-ratios", args.sweep_ratios, set(map(str, SWEEP_RATIOS))),
                               ("--allocations", args.allocations, {"uniform", "owl"}),
                               ("--reconstructs", args.reconstructs, {"none", "obs", "exact"}),
                               ("--peer-profiles", args.peer_profiles, {"uniform", "owl"})):
        unknown = sorted(set(value.split(",")) - known)
        if unknown:
            ap.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(sorted(known))} (comma-separated)")
    methods = args.methods.split(",")
    patterns = args.patterns.split(",")
    barber_inits = args.barber_inits.split(",")
    try:
        barber_ratios = None if args.barber_ratios is None else {float(r) for r in args.barber_ratios.split(",")}
    except ValueError:
        ap.error(f"--barber-ratios: {args.barber_ratios!r} is not a comma-separated list of numbers, e.g. 0.1,0")
    use_peer = not args.no_peer and args.peer_python.exists()
    old = json.loads(args.output.read_text()) if args.resume and args.output.is_file() else None
    if old is not None:  # the processor is checked before any work, the protocol once it is known (below)
        old_cpu, cpu = old.get("versions", {}).get("cpu"), versions()["cpu"]
        if old_cpu and old_cpu != cpu:
            refuse_resume(args.output, f"processor ({old_cpu}; this one: {cpu})")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="llmprune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    source = resolve_source(args.model)
    model_dir = gguf_to_folder(source.location) if source.kind in ("builtin", "gguf") else Path(source.location)
    model, tok = load_model(args.model, "float32", "cpu")
    calib_src = resolve("c4", "calibration", args.data_dir)
    calib = calibration_windows(tok, calib_src, args.nsamples, args.seqlen, seed=args.calib_seed)
    calib_file = work / "calib.safetensors"
    save_file({"input_ids": calib.contiguous()}, str(calib_file))
    eval_src = resolve("wikitext2", "evaluation", args.data_dir)
    eval_ids = evaluation_tokens(tok, eval_src)

    result: dict[str, Any] = {
        "benchmark": "unstructured", "model": args.model, "model_folder": str(model_dir),
        "protocol": {"calibration": {**calib_src.describe(), "nsamples": args.nsamples, "seqlen": args.seqlen,
                                     "seed": args.calib_seed, "tokens_sha256": token_hash(calib)},
                     "evaluation": {**eval_src.describe(), "seqlen": 2048, "windows": windows or "all"},
                     "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "versions": versions(), "runs": [], "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "commands": [" ".join(["benchmarks/unstructured.py", *sys.argv[1:]])],
    }

    def ppl(folder: str | None, net: Any = None) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM

        net = net if net is not None else AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return perplexity(net, eval_ids, seqlen=2048, windows=windows)

    finished: set[str] = set()
    if old is not None:
        if old.get("protocol") != result["protocol"]:
            refuse_resume(args.output, "protocol")
        # Kept in the file from the start, so a resumed run that dies loses nothing.
        result["runs"] = old["runs"]
        result["dense"] = old.get("dense")
        result["commands"] = old.get("commands", []) + result["commands"]  # every command that wrote rows
        if old.get("notes"):  # what was written about the earlier rows (load, pauses) stays with them
            result["notes"] = old["notes"]
        # rows written before --sparsities have no "target": they ran at --sparsity (0.5 in every such file)
        finished = {run_key(r["tool"], r["method"], r["pattern"], r.get("request", {}),
                            r.get("target", target_of(args, r["pattern"], 0.5))) for r in old["runs"]}

    def done(tool: str, method: str, pattern: str, options: dict[str, Any], target: float | None = None) -> bool:
        return run_key(tool, method, pattern, options, target_of(args, pattern, target)) in finished

    def record(entry: dict[str, Any]) -> None:
        entry["wikitext2"] = ppl(entry["folder"])
        result["runs"].append(entry)
        write_json_atomic(args.output, result)
        print(f"{entry['tool']:>13} {entry['method']:>10} {entry['pattern']:>12} {entry['target']:.2f} {entry['request']}  "
              f"ppl {entry['wikitext2']['ppl']:9.3f}  "
              f"prune {entry['prune_s']:7.1f}s  rss {entry['peak_rss_mb']:6.0f}MB  sparsity {entry['sparsity']}", flush=True)

    if not result.get("dense"):
        result["dense"] = {"wikitext2": ppl(None, model)}
    write_json_atomic(args.output, result)
    print(f"dense ppl {result['dense']['wikitext2']['ppl']:.3f}", flush=True)
    del model

    targets = [float(x) for x in args.sparsities.split(",")] if args.sparsities else [args.sparsity]
    owl = {"allocation": "owl", "owl_m": args.owl_m, "owl_lambda": args.owl_lambda}
    for pattern in patterns:
        for target in targets if pattern == "unstructured" else [None]:
            allocations = [{}] + ([owl] if "owl" in args.allocations.split(",") and pattern == "unstructured" else [])
            allocations = allocations if "uniform" in args.allocations.split(",") else allocations[1:]
            for method in methods:
                if method == "barber":
                    kind = "unstructured" if pattern == "unstructured" else "nm"
                    configs = args.barber_configs.split(",")
                    todo = ([{"init": init, **preset} for init, preset in BARBER_PRESETS.items()]
                            if "presets" in configs else [])
                    todo += BARBER_EXTRAS[kind] if "extras" in configs else []
                    todo += BARBER_RECONSTRUCT[kind] if "reconstruct" in configs else []
                    todo += BARBER_EXACT[kind] if "exact" in configs else []
                    for options in (o | a for o in todo if o["init"] in barber_inits
                                    and (barber_ratios is None or o["ratio"] in barber_ratios) for a in allocations):
                        done("llmprune", "barber", pattern, options, target) or record(
                            ours(args, work, "barber", pattern, options, target))
                else:
                    solvers = [r for r in args.reconstructs.split(",") if method != "sparsegpt" or r != "obs"]
                    for rec in solvers:
                        # SparseGPT reconstructs by itself: reconstruct_solver alone chooses how
                        extra = ({} if rec == "none" else {"reconstruct_solver": rec} if method == "sparsegpt"
                                 else {"reconstruct": True, "reconstruct_solver": rec})
                        for options in (extra | a for a in allocations):
                            done("llmprune", method, pattern, options, target) or record(
                                ours(args, work, method, pattern, options, target))
                if use_peer and method in args.peer_methods.split(","):
                    for profile in args.peer_profiles.split(","):
                        if profile == "owl" and pattern != "unstructured":
                            continue
                        request = {"profile": "owl"} if profile == "owl" else {}
                        done("llmcompressor", method, pattern, request, target) or record(
                            peer(args, work, method, pattern, calib_file, model_dir, request, target))
    if args.barber_sweep and "barber" in METHODS:  # over Wanda: ratio at output granularity first, then the rest
        sweep: list[tuple[str, dict[str, Any]]] = []
        nm_rules = {"output": ("reference", "paired"), "layer": ("reference",), "block": ("reference",), "input": ()}
        grans = args.sweep_granularities.split(",")
        ratios = [r for r in SWEEP_RATIOS if str(r) in args.sweep_ratios.split(",")]
        for gran in (g for g in SWEEP_GRANULARITIES if g in grans):
            for pattern in patterns:
                nm = pattern != "unstructured"
                for rule in nm_rules[gran] if nm else ("",):  # "input" cannot keep an N:M pattern (refused)
                    for ratio in ratios:
                        options = {"init": "wanda", "ratio": ratio, "granularity": gran}
                        sweep.append((pattern, options | ({"nm_rule": rule} if rule == "paired" else {})))
        for pattern, options in sweep:
            done("llmprune", "barber", pattern, options) or record(ours(args, work, "barber", pattern, options))
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(args.output, result)


if __name__ == "__main__":
    main()
