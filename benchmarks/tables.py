"""Generate the benchmark tables of README.md and docs/ from the result files (``make tables``).

Every table lives in a marked region of a Markdown file::

    <!-- table:NAME -->
    (generated: do not edit by hand)
    <!-- /table -->

``benchmarks/results/index.yaml`` says which result file(s) back which table and which builder
renders it; ``options/METHOD`` tables come from the method registry instead (the options and
defaults the code actually has). Each generated table opens with its protocol (model, calibration,
evaluation windows, host CPU), read from the result file, so no number in the docs is typed by hand.

    python benchmarks/tables.py           # rewrite the regions in place
    python benchmarks/tables.py --check   # exit 1 and name the stale regions (the test runs this)

Bad input fails with the file named: a result file without its protocol, a table claimed by two
index entries, a region naming a table nobody produces, a result file the index does not list.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any, Literal

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
INDEX = RESULTS / "index.yaml"
REGION = re.compile(r"(<!-- table:(?P<name>[\w/.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)
NAMES = {"magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "barber": "Barber", "cfsp": "CFSP",
         "flap": "FLAP", "wanda-sp": "Wanda-SP", "magnitude-sp": "magnitude-SP"}
PEERS = {"llmcompressor": "llm-compressor"}
# The paper's per-initializer presets (granularity, ratio), recipes/barber_*.yaml.
PRESETS = {"magnitude": ("block", 0.1), "wanda": ("output", 0.01), "sparsegpt": ("layer", 0.1)}


class TableError(Exception):
    """Bad input to the table generator; the message names the file."""


@dataclass
class Result:
    path: Path
    data: dict[str, Any]
    root: Path = RESULTS

    @property
    def rel(self) -> str:
        return self.path.relative_to(self.root).as_posix() if self.path.is_relative_to(self.root) else str(self.path)


# ----------------------------------------------------------------------------- formatting


def ppl(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:,.1f}" if x >= 1000 else f"{x:.3f}"


def secs(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def mb(x: float | None) -> str:
    return "" if x is None else f"{x:.0f}"


def count(x: int | None) -> str:
    return "" if x is None else f"{x:,}"


def markdown(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- protocols


def need(res: Result, *keys: str) -> Any:
    """``res.data[keys[0]][keys[1]]...``, or a TableError naming the file and the missing key."""
    value: Any = res.data
    for i, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise TableError(f"{res.rel}: no protocol: the result file lacks {'.'.join(keys[: i + 1])!r} "
                             "(every table states its protocol; re-run the benchmark, whose scripts record it)")
        value = value[key]
    return value


def host(res: Result) -> str:
    cpu = (res.data.get("versions") or {}).get("cpu")
    threads = (res.data.get("protocol") or {}).get("threads") if isinstance(res.data.get("protocol"), dict) else None
    threads = threads or (res.data.get("machine") or {}).get("torch_threads")
    where = cpu or "processor not recorded in the file"
    return f"{where}, {threads} threads" if threads else where


def calib_text(cal: dict[str, Any]) -> str:
    docs = cal.get("documents")
    where = f"{cal.get('dataset')} {cal.get('split', '')}".strip()
    if docs:
        where += f" documents {docs[0]}-{docs[1] - 1}"
    return f"{where}, {cal['nsamples']} x {cal['seqlen']} tokens, seed {cal.get('seed', 0)}"


def protocol_unstructured(res: Result) -> str:
    cal = need(res, "protocol", "calibration")
    ev = need(res, "protocol", "evaluation")
    model = need(res, "model")
    dense = (res.data.get("dense") or {}).get("wikitext2", {}).get("ppl")
    return (f"{model}, {res.data['protocol'].get('dtype', 'float32')} on {res.data['protocol'].get('device', 'cpu')}; "
            f"calibration: {calib_text(cal)}; evaluation: {ev['dataset']} {ev.get('split', '')}, seqlen {ev['seqlen']}, "
            f"first {ev['windows']} windows" + (f" (dense ppl {ppl(dense)})" if dense else "") + f"; host: {host(res)}")


def protocol_structured(res: Result) -> str:
    ev = need(res, "protocol", "eval")
    model = need(res, "model")
    cals = {}
    for run in need(res, "runs"):
        cal = run.get("calibration") or {}
        if "set" in cal:
            cals[cal["set"]] = calib_text(cal)
    if not cals:
        raise TableError(f"{res.rel}: no protocol: no run records its calibration")
    return (f"{model}, {res.data['protocol'].get('dtype', 'float32')}; ratios are of the "
            f"{res.data['protocol'].get('ratios_of', 'MLP channels')}; calibration: "
            + "; ".join(cals.values()) + f"; evaluation: {ev['dataset']}, seqlen {ev['seqlen']}, first {ev['windows']} "
            f"windows (dense ppl {ppl(need(res, 'dense', 'ppl'))}); host: {host(res)}")


def protocol_recovery(res: Result) -> str:
    pr, rec, ev = need(res, "protocol", "prune"), need(res, "protocol", "recover"), need(res, "protocol", "eval")
    return (f"{need(res, 'model')} pruned by {pr['method']} (calibration {pr['calib']} {pr['nsamples']} x "
            f"{pr['seqlen']} tokens); recovery: {rec['steps']} steps of {rec['batch_size']} x {rec['seqlen']} "
            f"{rec['train_dataset']} tokens, lr {rec['lr']:g}, LoRA rank budget {rec['rank_budget']} on "
            f"{rec['targets']}; evaluation: {ev['dataset']}, seqlen {ev['seqlen']}, first {ev['windows']} windows "
            f"(dense ppl {ppl(need(res, 'dense', 'ppl'))}); host: {host(res)}")


def protocol_scale(res: Result) -> str:
    text = need(res, "protocol")
    model = need(res, "model")
    if not isinstance(text, str):
        raise TableError(f"{res.rel}: no protocol: 'protocol' should describe the run")
    size = (f"{model['params'] / 1e9:.2f} B parameters, " if "params" in model else "") + (
        f"{model['checkpoint_bytes'] / 1e9:.1f} GB checkpoint" if "checkpoint_bytes" in model
        else f"{model.get('checkpoint_mb', 0):.0f} MB checkpoint")
    cal = res.data.get("calibration")
    cal_text = f"; calibration {cal['nsamples']} x {cal['seqlen']} tokens" if cal else ""
    return f"{text}; {model['layers']} layers, {size}{cal_text}; host: {host(res)}"


def protocol_eval_memory(res: Result) -> str:
    pr = need(res, "protocol")
    return (f"perplexity on {pr['dataset']}, seqlen {pr['seqlen']}, {pr['windows']} window(s), {pr['dtype']} on "
            f"{pr['device']}; {pr['process']}; head chunk {pr['head_chunk_bytes'] / 2**20:.0f} MiB of logits; "
            f"host: {host(res)}" + (f"; {res.data['note']}" if res.data.get("note") else ""))


def protocol_deploy(res: Result) -> str:
    pr = need(res, "protocol")
    return (f"SmolLM2-135M in llama.cpp (llama-cpp-python {need(res, 'versions', 'llama_cpp_python')}), "
            f"{pr['threads']} threads; calibration c4 {pr['nsamples']} x {pr['seqlen']} tokens, seed 0; prefill "
            f"{pr['prefill']} tokens, decode {pr['decode']} tokens, median of {pr['repeats']} rounds over all files; "
            f"perplexity: WikiText-2 test, {pr['eval_windows']} windows of {pr['eval_seqlen']} tokens; host: {host(res)}")


def protocol(res: Result) -> str:
    kind = res.data.get("benchmark")
    if isinstance(kind, str) and kind.startswith("deploy"):
        return protocol_deploy(res)
    if kind == "eval_memory":
        return protocol_eval_memory(res)
    if kind == "structured":
        return protocol_structured(res)
    if kind == "recovery":
        return protocol_recovery(res)
    if kind == "barber_memory" or "prune_over_floor" in res.data:
        return protocol_scale(res)
    return protocol_unstructured(res)


# ----------------------------------------------------------------------------- run labels


def swaps(run: dict[str, Any]) -> int | None:
    if run.get("method") != "barber":
        return None
    return sum(sum((layer.get("swaps") or {}).values()) for layer in run.get("layers") or [])


def run_label(run: dict[str, Any]) -> str:
    method = run["method"]
    opts = run.get("options") or {}
    if method == "barber":
        init = opts.get("init", "wanda")
        parts = [opts.get("granularity", "output"), f"ratio {opts.get('ratio', 0.01):g}"]
        if run.get("pattern", "unstructured") != "unstructured":
            parts.append(f"{opts.get('nm_rule')} rule")
        if opts.get("retain_reconstruction"):
            parts.append("`retain_reconstruction`")
        if opts.get("reconstruct"):
            parts.append("`reconstruct`" + (", exact solver" if opts.get("reconstruct_solver") == "exact" else ""))
        preset = (not opts.get("reconstruct") and not opts.get("retain_reconstruction")
                  and PRESETS.get(init) == (opts.get("granularity"), opts.get("ratio"))
                  and opts.get("nm_rule") in (None, "reference", "paired"))
        label = f"Barber over {NAMES.get(init, init)} ({', '.join(parts)})" + ("; paper preset" if preset else "")
    else:
        label = NAMES.get(method, method)
        if opts.get("reconstruct") or (method == "sparsegpt" and opts.get("reconstruct_solver") == "exact"):
            label += " + `reconstruct`" + (", exact solver" if opts.get("reconstruct_solver") == "exact" else "")
    if opts.get("allocation") == "owl" or (run.get("request") or {}).get("profile") == "owl":
        label += ", OWL"
    if run.get("tool", "llmprune") != "llmprune":
        label += f" ({PEERS.get(run['tool'], run['tool'])})"
    return label


def setting(run: dict[str, Any]) -> str:
    """The sparsity a run was asked for: "70%" (unstructured) or its N:M pattern."""
    if run.get("pattern", "unstructured") != "unstructured":
        return run["pattern"]
    return f"{run.get('target', 0.5):.0%}"


def run_ppl(run: dict[str, Any]) -> float | None:
    return (run.get("wikitext2") or {}).get("ppl")


# ----------------------------------------------------------------------------- builders


def build_runs(results: list[Result], pattern: str | None = None) -> str:
    """One row per run of one file: perplexity, prune time (also as a multiple of Wanda's in the same
    file and pattern), peak RSS, Barber's swaps."""
    (res,) = results
    runs = [r for r in need(res, "runs") if pattern is None or r.get("pattern") == pattern]
    if not runs:
        raise TableError(f"{res.rel}: no runs with pattern {pattern!r}")
    wanda = {r["pattern"]: r["prune_s"] for r in runs if r["method"] == "wanda" and r.get("tool") == "llmprune"}
    show_pattern = pattern is None and len({r["pattern"] for r in runs}) > 1
    has_swaps = any(r["method"] == "barber" for r in runs)
    header = (["pattern"] if show_pattern else []) + ["run", "ppl", "prune s", "/ Wanda", "peak RSS MB"]
    header += ["swaps"] if has_swaps else []
    rows = []
    for r in runs:
        ratio = r["prune_s"] / wanda[r["pattern"]] if r["pattern"] in wanda and r.get("prune_s") else None
        row = ([r["pattern"]] if show_pattern else []) + [
            run_label(r), ppl(run_ppl(r)), secs(r.get("prune_s")), f"{ratio:.2f}x" if ratio else "",
            mb(r.get("peak_rss_mb"))]
        rows.append(row + ([count(swaps(r))] if has_swaps else []))
    return markdown(header, rows)


def build_frontier(results: list[Result]) -> str:
    """Every run of one or more files per setting (50/60/70%, 2:4, 4:8): perplexity against the best
    llm-compressor row of that setting, prune time and peak RSS as multiples of our uniform Wanda's."""
    runs = [r for res in results for r in need(res, "runs")]
    order: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        order.setdefault(setting(r), []).append(r)
    rows = []
    for key, group in order.items():
        peers = [run_ppl(r) for r in group if r.get("tool") != "llmprune" and run_ppl(r)]
        wanda = next((r for r in group if r.get("tool") == "llmprune" and r["method"] == "wanda"
                      and not r.get("request")), None)
        for r in group:
            vs = f"{run_ppl(r) / min(peers):.3f}" if peers and run_ppl(r) else ""
            t = f"{r['prune_s'] / wanda['prune_s']:.2f}x" if wanda and r.get("prune_s") else ""
            m = f"{r['peak_rss_mb'] / wanda['peak_rss_mb']:.2f}x" if wanda and r.get("peak_rss_mb") else ""
            rows.append([key, run_label(r), ppl(run_ppl(r)), vs, secs(r.get("prune_s")), t, mb(r.get("peak_rss_mb")), m])
    return markdown(["setting", "run", "ppl", "/ best peer", "prune s", "/ Wanda", "peak RSS MB", "/ Wanda"], rows)


def build_peer(results: list[Result]) -> str:
    """llmprune and llm-compressor side by side per method and pattern, on the same calibration tokens."""
    (res,) = results
    by = {(r["tool"], r["method"], r["pattern"]): r for r in need(res, "runs")}
    rows = []
    for (tool, method, pattern), ours in by.items():
        if tool != "llmprune":
            continue
        peer = by.get(("llmcompressor", method, pattern))
        name = NAMES.get(method, method) + ("" if pattern == "unstructured" else f" {pattern}")
        diff = f"{(run_ppl(ours) / run_ppl(peer) - 1) * 100:+.1f}%" if peer else ""
        speed = f"{peer['prune_s'] / ours['prune_s']:.1f}x" if peer else ""
        rows.append([name, ppl(run_ppl(ours)), ppl(run_ppl(peer)) if peer else "", diff, secs(ours["prune_s"]),
                     secs(peer["prune_s"]) if peer else "", speed,
                     mb(ours.get("peak_rss_mb")) + (f" / {mb(peer.get('peak_rss_mb'))}" if peer else "")])
    return markdown(["method", "llmprune ppl", "llm-compressor ppl", "difference", "llmprune prune s",
                     "llm-compressor prune s", "llmprune faster by", "peak RSS MB (ours / peer)"], rows)


def build_seeds(results: list[Result], method: str, pattern: str) -> str:
    """One method and pattern over several calibration seeds (one file per seed), ours against the peer."""
    cols, ours, peer = [], [], []
    for res in results:
        seed = need(res, "protocol", "calibration", "seed")
        by = {r["tool"]: r for r in need(res, "runs") if r["method"] == method and r["pattern"] == pattern}
        if "llmprune" not in by or "llmcompressor" not in by:
            raise TableError(f"{res.rel}: no llmprune and llm-compressor {method} {pattern} runs")
        cols.append(f"seed {seed}")
        ours.append(run_ppl(by["llmprune"]))
        peer.append(run_ppl(by["llmcompressor"]))
    diff = [f"{(a / b - 1) * 100:+.1f}%" for a, b in zip(ours, peer, strict=True)]
    return markdown([f"{NAMES.get(method, method)} {pattern}", *cols, "mean"], [
        ["llmprune", *map(ppl, ours), f"**{ppl(mean(ours))}**"],
        ["llm-compressor", *map(ppl, peer), f"**{ppl(mean(peer))}**"],
        ["difference", *diff, f"{(mean(ours) / mean(peer) - 1) * 100:+.1f}%"]])


def build_sweep(results: list[Result], pattern: str) -> str:
    """Barber over Wanda: perplexity (swaps in the model) per granularity, rule and ratio. Cells that only
    a later file holds are marked with a dagger."""
    cells: dict[tuple[str, float], tuple[str, bool]] = {}
    ratios: set[float] = set()
    order: list[str] = []
    for i, res in enumerate(results):
        for r in need(res, "runs"):
            if r["method"] != "barber" or r["pattern"] != pattern:
                continue
            o = r["options"]
            key = f"`{o['granularity']}`" + ("" if pattern == "unstructured" else f", {o['nm_rule']}")
            if key not in order:
                order.append(key)
            ratios.add(o["ratio"])
            if (key, o["ratio"]) not in cells:
                cells[(key, o["ratio"])] = (f"{ppl(run_ppl(r))} ({count(swaps(r))})", i > 0)
    cols = sorted(ratios)
    rows = [[key] + [cells[(key, c)][0] + (" †" if cells[(key, c)][1] else "") if (key, c) in cells else ""
                     for c in cols] for key in order]
    return markdown(["granularity" + ("" if pattern == "unstructured" else ", rule"),
                     *[f"ratio {c:g}" for c in cols]], rows)


def structured_label(run: dict[str, Any]) -> str:
    opts = dict(run.get("options") or {})
    name = NAMES.get(run["method"], run["method"])
    if run["method"] == "cfsp":
        score, norm = opts.pop("score", "weight_aware"), opts.pop("normalize", "per_token")
        name += " " + ("defaults" if (score, norm) == ("weight_aware", "per_token") else f"{score}, {norm}")
        if (score, norm) == ("faithful", "reference"):
            name += " (the released code)"
    return name + "".join(f", {k} {v}" for k, v in opts.items())


def build_structured(results: list[Result], calibration: str) -> str:
    """Perplexity per structured method and options (rows) and ratio of MLP channels removed (columns)."""
    (res,) = results
    runs = [r for r in need(res, "runs") if (r.get("calibration") or {}).get("set") == calibration]
    if not runs:
        raise TableError(f"{res.rel}: no runs calibrated on {calibration!r}")
    ratios = sorted({r["ratio"] for r in runs})
    table: dict[str, dict[float, dict[str, Any]]] = {}
    for r in runs:
        table.setdefault(structured_label(r), {})[r["ratio"]] = r
    rows = [[label, *[ppl(cells[x]["ppl"]) if x in cells else "" for x in ratios]] for label, cells in table.items()]
    first = next(iter(table.values()))
    rows.append(["parameters (first row)", *[count(first[x]["params"]["pruned"]) if x in first else "" for x in ratios]])
    if calibration == "c4" and all("speedup" in first.get(x, {}) for x in ratios):
        rows.append(["prefill / decode speed-up (first row)",
                     *[f"{first[x]['speedup']['prefill']:.2f}x / {first[x]['speedup']['decode']:.2f}x" for x in ratios]])
    return markdown([f"{calibration} calibration", *[f"{x:.0%}" for x in ratios]], rows)


def build_recovery(results: list[Result]) -> str:
    """Recovered perplexity (share of the gap to dense) per ratio and seed, one column per capacity rule;
    one file per seed, then the means."""
    variants: list[str] = []
    rows, per = [], {}
    for res in results:
        seed = need(res, "protocol", "recover", "seed")
        by_ratio: dict[float, dict[str, dict[str, Any]]] = {}
        for r in need(res, "runs"):
            by_ratio.setdefault(r["ratio"], {})[r["variant"]] = r
            if r["variant"] not in variants:
                variants.append(r["variant"])
        for ratio, vs in sorted(by_ratio.items()):
            pruned = next(iter(vs.values()))["ppl"]["pruned"]
            rows.append((ratio, seed, pruned, {v: (r["ppl"]["recovered"], r["recovered_share"]) for v, r in vs.items()}))
            for v, r in vs.items():
                per.setdefault((ratio, v), []).append(r["ppl"]["recovered"])
    rows.sort(key=lambda row: (row[0], row[1]))
    out = [[f"{ratio:.0%}", str(seed), ppl(pruned),
            *[(f"{ppl(cells[v][0])} ({cells[v][1]:.1%})" if v in cells else "") for v in variants]]
           for ratio, seed, pruned, cells in rows]
    if len(results) > 1:
        for ratio in sorted({row[0] for row in rows}):
            out.append([f"{ratio:.0%}", "mean", "", *[ppl(mean(per[(ratio, v)])) if (ratio, v) in per else ""
                                                      for v in variants]])
    label = {"uniform": "uniform LoRA", "importance": "IG-LoRA (importance)", "removed": "IG-LoRA (removed)",
             "importance-sqrt": "IG-LoRA, power 0.5"}
    return markdown(["MLP channels removed", "seed", "pruned ppl", *[label.get(v, v) for v in variants]], out)


def build_streaming(results: list[Result]) -> str:
    """Streamed Wanda on a 7B layout against the floor (one streamed forward of the same tokens)."""
    (res,) = results
    floor = need(res, "floor", "forward_s")
    rows = []
    for key, label in (("prune", "streamed Wanda, `method.sequential=layer` (the papers' protocol)"),
                       ("prune_sequential_linear", "streamed Wanda, `method.sequential=linear`")):
        run = need(res, key)
        rows.append([label, secs(run["prune_s"]), mb(run["peak_rss_mb"]), f"{run['prune_s'] / floor:.2f}x"])
    rows.append(["floor: one streamed forward pass", secs(floor), mb(res.data["floor"]["peak_rss_mb"]), "1x"])
    return markdown(["run", "time s", "peak RSS MB", "/ floor"], rows)


def build_memory(results: list[Result]) -> str:
    """Peak RSS of Wanda and Barber at 7B widths, loaded whole and streamed, each run in its own process."""
    (res,) = results
    rows = [[NAMES.get(r["method"], r["method"]), "loaded" if r["mode"] == "memory" else "streamed",
             mb(r["peak_rss_mb"]), secs(r["prune_s"])] for r in need(res, "runs")]
    return markdown(["method", "model", "peak RSS MB", "prune s"], rows)


def build_eval_memory(results: list[Result]) -> str:
    """Peak RSS and time of perplexity evaluation per model: full logits (before) against the chunked head."""
    (res,) = results
    rows = []
    for model, both in need(res, "results").items():
        full, chunked = both["full"], both["chunked"]
        rows.append([model, f"{full['vocab']:,}", mb(full["peak_rss_mb"]), mb(chunked["peak_rss_mb"]),
                     mb(chunked["peak_rss_mb_after_load"]), secs(full["eval_s"]), secs(chunked["eval_s"]),
                     ppl(chunked["ppl"]), f"{both['ppl_rel_diff']:.1e}"])
    return markdown(["model", "vocabulary", "peak RSS MB, full logits", "peak RSS MB, chunked", "after loading MB",
                     "eval s, full", "eval s, chunked", "ppl", "ppl rel. diff"], rows)


DEPLOY_LABELS = {"dense": "dense", "wanda50": "Wanda 50% (unstructured)"}


def deploy_label(name: str, variant: dict[str, Any]) -> str:
    if name in DEPLOY_LABELS:
        return DEPLOY_LABELS[name]
    opts = variant.get("method_options") or {}
    widths = ("uniform widths" if opts.get("uniform") else
              f"per-layer widths, multiples of {opts['round_to']}" if opts.get("round_to") else "per-layer widths")
    return f"{NAMES.get(variant['method'], variant['method'])} {variant['sparsity']:.0%} of MLP channels, {widths}"


def build_deploy(results: list[Result], variants: list[str] | None = None, types: list[str] | None = None) -> str:
    """Speed, size and perplexity of GGUF exports in llama.cpp, against the dense export of the same type.
    The ideal decode speed-up is dense weight bytes per decoded token over the variant's."""
    (res,) = results
    rows = []
    for name, row in need(res, "results").items():
        if variants is not None and name not in variants:
            continue
        label = deploy_label(name, res.data["variants"][name])
        for qtype, e in row["types"].items():
            if types is not None and qtype not in types:
                continue
            rows.append([label, qtype, f"`{e['arch']}`", mb(e["file_bytes"] / 1e6),
                         mb(e["weight_bytes_per_token"] / 1e6), f"{e['prefill_tok_s']:.0f}",
                         f"{e['decode_tok_s']:.1f}", f"{e['prefill_speedup']:.2f}x",
                         f"{e['decode_speedup']:.2f}x ({e['ideal_decode_speedup']:.2f}x)",
                         f"{e['ppl_llama_cpp']:.2f}", f"{row['ppl_pytorch_f32']:.2f}"])
    return markdown(["model", "type", "llama.cpp arch", "file MB", "weights read per token MB", "prefill tok/s",
                     "decode tok/s", "prefill speed-up", "decode speed-up (ideal)", "ppl llama.cpp",
                     "ppl PyTorch f32"], rows)


BUILDERS: dict[str, Callable[..., str]] = {
    "runs": build_runs, "peer": build_peer, "seeds": build_seeds, "sweep": build_sweep,
    "structured": build_structured, "recovery": build_recovery, "streaming": build_streaming,
    "memory": build_memory, "eval_memory": build_eval_memory, "deploy": build_deploy,
    "frontier": build_frontier,
}


def build_options(method: str) -> str:
    """Every option of a registered method with its type, default and description, from the registry."""
    sys.path.insert(0, str(REPO / "src"))
    from llmprune.methods import METHODS  # the registry imports torch; only the options tables need it

    cls = METHODS.get(method)
    rows = []
    for name, field in cls.Options.model_fields.items():
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is Literal else ()
        kind = " \\| ".join(f"`{v}`" for v in choices) if choices else getattr(field.annotation, "__name__", "")
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append([f"`{name}`", kind, f"`{field.default!r}`", description])
    return markdown(["option", "values", "default", "meaning"], rows)


def build_recipe_fields() -> str:
    """Every recipe field outside ``method`` (whose fields are the method's options), with its default."""
    sys.path.insert(0, str(REPO / "src"))
    from llmprune.recipe import Recipe

    rows = []
    for section, field in Recipe.model_fields.items():
        sub = getattr(field.annotation, "model_fields", None)
        if sub is None:
            rows.append([f"`{section}`", f"`{field.default!r}`", (field.description or "").replace("|", "\\|")])
            continue
        for name, f in sub.items():
            default = "`[]`" if f.default_factory is list else f"`{f.default!r}`"
            if section == "method" and name not in ("name", "sparsity", "pattern"):
                continue
            rows.append([f"`{section}.{name}`", default, (f.description or "").replace("|", "\\|").replace("\n", " ")])
    return markdown(["field", "default", "meaning"], rows)


def build_recipe_list() -> str:
    """The recipes shipped in recipes/, each with the comment at its top (the command, then what it is)."""
    rows = []
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        comment = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
        what = " ".join(c for c in comment if not c.startswith("llmprune ")).replace("|", "\\|")
        rows.append([f"`recipes/{path.name}`", what])
    return markdown(["recipe", "what it runs"], rows)


def build_best_presets() -> str:
    """``--preset best``: each shipped preset with its row in the benchmark file that backs it, against our
    Wanda (time, peak RSS) and the best llm-compressor row of that file at the same setting."""
    sys.path.insert(0, str(REPO / "src"))
    from llmprune.presets import best_presets, setting_of

    rows = []
    for setting, preset in sorted(best_presets().items()):
        method = preset["method"]
        request = {k: v for k, v in method.items() if k not in ("name", "sparsity", "pattern")}
        runs = [r for r in json.loads((REPO / preset["benchmark"]).read_text())["runs"]
                if setting_of({"pattern": r["pattern"], "sparsity": r.get("target", 0.5)}) == setting]
        ours = next(r for r in runs if r["tool"] == "llmprune" and r["method"] == method["name"]
                    and (r.get("request") or {}) == request)
        wanda = next(r for r in runs if r["tool"] == "llmprune" and r["method"] == "wanda" and not r.get("request"))
        peers = [r for r in runs if r["tool"] != "llmprune"]
        peer = min(peers, key=lambda r: r["wikitext2"]["ppl"]) if peers else None
        ppl = ours["wikitext2"]["ppl"]
        vs_peer = (f"{peer['wikitext2']['ppl']:.2f} ({PEERS.get(peer['tool'], peer['tool'])} "
                   f"{NAMES.get(peer['method'], peer['method'])}{' OWL' if (peer.get('request') or {}).get('profile') == 'owl' else ''}"
                   f"), {ppl / peer['wikitext2']['ppl']:.3f}x" if peer else "no peer row in this file")
        options = ", ".join(f"{k}={v}" for k, v in request.items())
        rows.append([setting.replace("unstructured", "").replace("of", ":") + ("%" if "unstructured" in setting else ""),
                     f"{NAMES.get(method['name'], method['name'])} ({options})", f"{ppl:.2f}",
                     f"{wanda['wikitext2']['ppl']:.2f}", vs_peer,
                     f"{ours['prune_s'] / wanda['prune_s']:.1f}x", f"{ours['peak_rss_mb'] / wanda['peak_rss_mb']:.2f}x",
                     f"`{preset['benchmark'].removeprefix('benchmarks/results/')}`"])
    return markdown(["setting", "preset", "ppl", "our Wanda", "best peer row, ratio", "time vs Wanda",
                     "peak RSS vs Wanda", "backed by"], rows)


# ----------------------------------------------------------------------------- index and regions


GENERATED: dict[str, Callable[[], str]] = {"recipe-fields": build_recipe_fields, "recipes": build_recipe_list,
                                           "best-presets": build_best_presets}


@dataclass
class Spec:
    name: str
    builder: str
    files: list[Path]
    args: dict[str, Any]
    root: Path = RESULTS


def load_index(index: Path = INDEX) -> dict[str, Spec]:
    """The index's tables, checked: every file exists, no table is claimed twice, every result file
    under the index's folder is listed (as a table's source or under ``data``)."""
    root = index.parent
    try:
        doc = yaml.safe_load(index.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TableError(f"{index}: cannot read the index: {exc}") from None
    specs: dict[str, Spec] = {}
    listed: set[Path] = set()
    for entry in doc.get("tables") or []:
        name, files = entry["table"], entry["files"]
        files = [files] if isinstance(files, str) else files
        if name in specs:
            raise TableError(f"{index.name}: table {name!r} is claimed by {', '.join(files)} and by "
                             f"{', '.join(p.relative_to(root).as_posix() for p in specs[name].files)}; "
                             "one table, one index entry")
        builder = entry.get("builder", "runs")
        if builder not in BUILDERS:
            raise TableError(f"{index.name}: table {name!r}: unknown builder {builder!r}; known: {', '.join(BUILDERS)}")
        paths = [root / f for f in files]
        for p in paths:
            if not p.is_file():
                raise TableError(f"{index.name}: table {name!r}: result file {p.relative_to(root)} does not exist")
        listed.update(paths)
        specs[name] = Spec(name, builder, paths, entry.get("args") or {}, root)
    listed.update(root / d["file"] for d in doc.get("data") or [])
    for path in sorted(root.rglob("*.json")):
        if path not in listed:
            raise TableError(f"{path.relative_to(root)}: result file not in {index.name} (list it under a table "
                             "or under data, with what it backs)")
    return specs


def render(spec: Spec) -> str:
    root = spec.root
    results = []
    for path in spec.files:
        try:
            results.append(Result(path, json.loads(path.read_text()), root))
        except (OSError, json.JSONDecodeError) as exc:
            raise TableError(f"{path}: not a readable result file: {exc}") from None
    for res in results:  # reject a file without its protocol before building anything
        protocol(res)
    parts = [protocol(r).split("; ") for r in results]
    common = [p for p in parts[0] if all(p in other for other in parts[1:])]
    head = "Protocol: " + "; ".join(common)
    for res, own in zip(results, parts, strict=True):
        if len(results) > 1 and (extra := [p for p in own if p not in common]):
            head += f"; `{res.rel}`: " + "; ".join(extra)
    table = BUILDERS[spec.builder](results, **spec.args)
    sources = ", ".join(f"`benchmarks/results/{r.rel}`" for r in results)
    return f"<!-- generated by benchmarks/tables.py; do not edit -->\n*{head}.*\n\n{table}\n\nSource: {sources}.\n"


def markdown_files(repo: Path = REPO) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))]


def regenerate(files: list[Path], specs: dict[str, Spec]) -> dict[Path, str]:
    """New text of every file whose regions differ from what the result files give."""
    cache: dict[str, str] = {}

    def body(name: str, path: Path) -> str:
        if name not in cache:
            if name.startswith("options/"):
                cache[name] = build_options(name.split("/", 1)[1]) + "\n"
            elif name in GENERATED:
                cache[name] = GENERATED[name]() + "\n"
            elif name in specs:
                cache[name] = render(specs[name])
            else:
                raise TableError(f"{path}: region table:{name} names no table of {INDEX.name} "
                                 f"(nor options/METHOD, {', '.join(GENERATED)})")
        return cache[name]

    changed = {}
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        new = REGION.sub(lambda m, path=path: m.group(1) + body(m.group("name"), path) + m.group(4), text)
        if new != text:
            changed[path] = new
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale")
    args = ap.parse_args(argv)
    try:
        changed = regenerate(markdown_files(), load_index())
    except TableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, text in changed.items():
        rel = path.relative_to(REPO)
        if args.check:
            print(f"stale: {rel} (run `make tables`)", file=sys.stderr)
        else:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
            print(f"updated {rel}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
