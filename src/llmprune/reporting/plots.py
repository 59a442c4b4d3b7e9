"""The report's plots: what to draw (:func:`plot_specs`, plain data) and drawing it (:func:`render`, matplotlib).

- perplexity vs sparsity, one plot per perplexity setting (dataset, seqlen, windows), so that only
  numbers taken under one setting share axes; one line per group of runs that differ only in how
  much they prune (method, N:M pattern, options); x is the achieved sparsity (zero fraction of the
  decoder linears) or, for structured runs, the removed parameter fraction; dense perplexity at x = 0;
- mean zero-shot accuracy vs sparsity, one plot per zero-shot setting and task set, lines and dense
  point as above;
- per-layer sparsity of every unstructured / N:M run (structured runs have no zeros; see widths);
- CFSP block importance per layer (one plot per importance metric) and per-layer MLP widths;
- LLM-Barber swaps per layer (summed over the layer's linears).

A plot no run has data for is left out. matplotlib is imported only to draw (``pip install
llmprune[report]``), with the Agg backend.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LLMPruneError
from .load import Run
from .tables import (
    calibration_text,
    group_label,
    ppl_header,
    ppl_setting,
    ppl_settings,
    zeroshot_means,
    zs_label,
)

Series = dict[str, tuple[list[float], list[float]]]


@dataclass
class PlotSpec:
    file: str
    title: str
    xlabel: str
    ylabel: str
    series: Series  # label -> (x, y), drawn as one line each
    reference: tuple[str, ...] = ()  # labels drawn as references (dense): grey, dashed or a star
    log_y: bool = False  # perplexity spans orders of magnitude between light and heavy pruning


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def achieved_x(run: Run) -> float | None:
    """Where a run sits on the sparsity axis: removed parameter fraction if structured, else zero fraction."""
    if run.structured:
        return float(run.report["structure"]["params"]["removed_fraction"])
    overall = (run.report.get("sparsity") or {}).get("overall")
    return None if overall is None else float(overall)


def line_labels(runs: list[Run]) -> dict[str, str]:
    """Run label -> its line in perplexity-vs-sparsity: the group label (:func:`group_label`), with the
    model when the runs differ in model and the calibration when runs of one group differ in it."""
    models = {str(r.report["model"]) for r in runs}
    calibrations: dict[str, set[str]] = {}
    for run in runs:
        calibrations.setdefault(group_label(run), set()).add(calibration_text(run))
    out = {}
    for run in runs:
        label = group_label(run)
        if len(calibrations[label]) > 1:
            label += f" [calib {calibration_text(run)}]"
        out[run.label] = f"{run.report['model']}: {label}" if len(models) > 1 else label
    return out


def _ppl_plots(runs: list[Run]) -> list[PlotSpec]:
    plots = []
    for setting, members in ppl_settings(runs).items():
        lines = line_labels(members)
        dataset = setting[0]
        points: dict[str, list[tuple[float, float]]] = {}
        dense: dict[str, float] = {}
        structured = set()
        for run in members:
            res = (run.report.get("eval") or {}).get(dataset)
            x = achieved_x(run)
            if res and ppl_setting(dataset, res) == setting and x is not None:
                points.setdefault(lines[run.label], []).append((x, float(res["ppl"])))
                structured.add(run.structured)
            dres = (run.report.get("eval_dense") or {}).get(dataset)
            if dres and ppl_setting(dataset, dres) == setting:
                dense.setdefault(str(run.report["model"]), float(dres["ppl"]))
        if not points:
            continue
        series: Series = {}
        for label, pts in points.items():
            pts.sort()
            series[label] = ([p[0] for p in pts], [p[1] for p in pts])
        for model, ppl in dense.items():
            series["dense" if len(dense) == 1 else f"dense {model}"] = ([0.0], [ppl])
        reference = tuple(label for label in series if label not in points)
        xlabel = _sparsity_xlabel(structured)
        ys = [y for _, yv in series.values() for y in yv]
        plots.append(PlotSpec(f"ppl_vs_sparsity_{_safe(dataset)}_{setting[1]}x{setting[2]}.png",
                              f"{ppl_header(setting)} vs sparsity", xlabel, f"{dataset} perplexity", series,
                              reference, log_y=max(ys) > 10 * min(ys) > 0))
    return plots


def _sparsity_xlabel(structured: set[bool]) -> str:
    return ("removed parameter fraction" if structured == {True} else
            "achieved sparsity (zero fraction of decoder linears)" if structured == {False} else
            "achieved sparsity (structured runs: removed parameter fraction)")


def _zeroshot_plots(runs: list[Run]) -> list[PlotSpec]:
    """Mean zero-shot accuracy vs sparsity, one plot per (setting, task set): only comparable means share axes."""
    groups = zeroshot_means(runs)
    plots = []
    for i, ((setting, tasks), members) in enumerate(groups.items()):
        lines = line_labels(members)
        points: dict[str, list[tuple[float, float]]] = {}
        for run in members:
            x, acc = achieved_x(run), run.report["zeroshot"].get("mean", {}).get("acc")
            if x is not None and acc is not None:
                points.setdefault(lines[run.label], []).append((x, float(acc)))
        if not points:
            continue
        series: Series = {label: ([p[0] for p in sorted(pts)], [p[1] for p in sorted(pts)])
                          for label, pts in points.items()}
        dense = {str(r.report["model"]): float(r.report["zeroshot_dense"]["mean"]["acc"])
                 for r in zeroshot_means(runs, "zeroshot_dense").get((setting, tasks), [])
                 if r.report["zeroshot_dense"].get("mean", {}).get("acc") is not None}
        for model, acc in dense.items():
            series["dense" if len(dense) == 1 else f"dense {model}"] = ([0.0], [acc])
        file = "mean_acc_vs_sparsity.png" if len(groups) == 1 else f"mean_acc_vs_sparsity_{i + 1}.png"
        plots.append(PlotSpec(file, f"mean zero-shot accuracy vs sparsity ({zs_label(setting)}; {', '.join(tasks)})",
                              _sparsity_xlabel({r.structured for r in members if lines[r.label] in points}),
                              "mean accuracy", series, tuple(label for label in series if label not in points)))
    return plots


def _per_layer(runs: list[Run], values: Any) -> Series:
    series: Series = {}
    for run in runs:
        ys = values(run)
        if ys:
            series[run.label] = ([float(i) for i in range(len(ys))], [float(y) for y in ys])
    return series


def _layer_sparsity(run: Run) -> list[float] | None:
    layers = (run.report.get("sparsity") or {}).get("layers")
    return None if run.structured or not layers else [layer["sparsity"] for layer in layers]


def _widths(run: Run) -> list[float] | None:
    return run.report["structure"]["mlp_channels"].get("widths") if run.structured else None


def _swaps(run: Run) -> list[float] | None:
    layers = run.report.get("layers") or []
    if not layers or not all(isinstance(layer, dict) and "swaps" in layer for layer in layers):
        return None
    return [sum(layer["swaps"].values()) for layer in layers]


def plot_specs(runs: list[Run]) -> list[PlotSpec]:
    """Every plot the runs have data for, in report order."""
    plots = _ppl_plots(runs) + _zeroshot_plots(runs)
    series = _per_layer(runs, _layer_sparsity)
    if series:
        plots.append(PlotSpec("layer_sparsity.png", "sparsity per decoder layer", "decoder layer",
                              "zero fraction of the layer's linears", series))
    metrics: dict[str, list[Run]] = {}
    for run in runs:
        if run.structured and "block_importance" in run.report["structure"]:
            metrics.setdefault(run.report["structure"]["block_importance"]["metric"], []).append(run)
    for metric, members in metrics.items():
        series = _per_layer(members, lambda r: r.report["structure"]["block_importance"]["values"])
        file = "block_importance.png" if len(metrics) == 1 else f"block_importance_{_safe(metric)}.png"
        plots.append(PlotSpec(file, f"CFSP block importance ({metric}) per layer", "decoder layer",
                              f"block importance ({metric})", series))
    series = _per_layer(runs, _widths)
    if series:
        dense_widths = {r.report["structure"]["mlp_channels"].get("dense_width") for r in runs if r.label in series}
        reference: tuple[str, ...] = ()
        if len(dense_widths) == 1 and None not in dense_widths:
            n = max(len(x) for x, _ in series.values())
            series["dense width"] = ([float(i) for i in range(n)], [float(dense_widths.pop())] * n)
            reference = ("dense width",)
        plots.append(PlotSpec("mlp_widths.png", "MLP width per layer (structured runs)", "decoder layer",
                              "kept MLP channels", series, reference))
    series = _per_layer(runs, _swaps)
    if series:
        plots.append(PlotSpec("barber_swaps.png", "LLM-Barber swaps per layer", "decoder layer",
                              "swaps (summed over the layer's linears)", series))
    return plots


def pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend, or a clear error naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise LLMPruneError("the report's plots need matplotlib: pip install 'llmprune[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render(spec: PlotSpec, path: Path) -> Series:
    """Draw ``spec`` into the PNG ``path``; returns the series as read back from the drawn lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=110)
    try:
        for label, (xs, ys) in spec.series.items():
            if label in spec.reference and len(xs) == 1:
                ax.plot(xs, ys, linestyle="", marker="*", markersize=11, color="0.2", label=label)
            elif label in spec.reference:
                ax.plot(xs, ys, linestyle="--", color="0.5", label=label)
            else:
                ax.plot(xs, ys, marker="o", markersize=4, label=label)
        ax.set(title=textwrap.fill(spec.title, 70), xlabel=spec.xlabel, ylabel=spec.ylabel)
        if spec.log_y:
            ax.set_yscale("log")
            ax.set_ylabel(f"{spec.ylabel} (log scale)")
        if spec.xlabel == "decoder layer":
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png")
        return {line.get_label(): ([float(v) for v in line.get_xdata()], [float(v) for v in line.get_ydata()])
                for line in ax.get_lines()}
    finally:
        plt.close(fig)
