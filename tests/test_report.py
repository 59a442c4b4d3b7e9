"""``llmprune report``: comparison reports over real tiny-model runs (prune, sweep and eval reports)."""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import llmprune
from llmprune import cli
from llmprune import report as report_module
from llmprune.cli import app
from llmprune.errors import LLMPruneError
from llmprune.io.save import write_json_atomic
from llmprune.reporting import Run, build_report
from llmprune.reporting.plots import line_labels

from .conftest import save_tiny

pytest.importorskip("matplotlib")
runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Real runs on one tiny llama: a wanda sweep (2 points), magnitude, cfsp at 2 ratios, barber, and an
    ``llmprune eval --json``-style report of the dense model at another seqlen."""
    base = tmp_path_factory.mktemp("report-runs")
    model = save_tiny(base / "tiny")
    calib = base / "calib.txt"
    calib.write_text(" ".join(f"sentence number {i} talks about pruning models." for i in range(400)))
    heldout = base / "heldout.txt"  # a small local evaluation text: perplexity column "heldout ppl @64 x2"
    heldout.write_text(" ".join(f"held-out line {i}: the pruned model reads this text." for i in range(60)))
    common = dict(calib_dataset=str(calib), nsamples=4, seqlen=32, eval=str(heldout), eval_seqlen=64, eval_windows=2)
    sweep = base / "sweep-wanda"
    folders = {
        "wanda30": (sweep / "sparsity-0.3", dict(method="wanda", sparsity=0.3)),
        "wanda60": (sweep / "sparsity-0.6", dict(method="wanda", sparsity=0.6, eval_dense=False)),
        "mag": (base / "mag", dict(method="magnitude", sparsity=0.5)),
        "cfsp20": (base / "cfsp20", dict(method="cfsp", sparsity=0.2)),
        "cfsp40": (base / "cfsp40", dict(method="cfsp", sparsity=0.4, eval_dense=False)),
        "barber": (base / "barber", dict(method="barber", sparsity=0.5, nsamples=2, eval_dense=False,
                                          method_options={"ratio": 0.5})),
    }
    reports = {}
    for name, (out, kw) in folders.items():
        reports[name] = llmprune.prune(str(model), output=str(out), **{**common, **kw}).report
    write_json_atomic(sweep / "sweep.json", {
        "sweep": {"model": str(model), "method": "wanda", "parameter": "sparsity", "values": [0.3, 0.6]},
        "points": [{"value": 0.3, "folder": "sparsity-0.3"}, {"value": 0.6, "folder": "sparsity-0.6"}],
    })
    dense32 = llmprune.evaluate(str(model), datasets=str(heldout), seqlen=32, windows=2)
    write_json_atomic(base / "dense-eval32.json", dense32)
    return {"base": base, "sweep": sweep, "folders": {k: v[0] for k, v in folders.items()}, "reports": reports,
            "dense32": base / "dense-eval32.json", "model": model, "heldout": heldout}


def _row(markdown: str, label: str) -> list[str]:
    """The cells of the Markdown table row of run ``label``."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{markdown}")


def _header(markdown: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith("| run |"))
    return [c.strip() for c in line.split("|")[1:-1]]


def _cell(markdown: str, label: str, header: str) -> str:
    return _row(markdown, label)[_header(markdown).index(header)]


def _check_png(path: Path) -> None:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000, path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.01  # not a blank canvas


@pytest.fixture(scope="module")
def full(runs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folders = runs["folders"]
    out = tmp_path_factory.mktemp("report-out") / "report"
    args = [runs["sweep"], folders["mag"], folders["cfsp20"], folders["cfsp40"], folders["barber"] / "llmprune.json"]
    return build_report(args, out, title="tiny comparison")


def test_report_compares_runs_of_different_methods(runs: dict[str, Any], full) -> None:  # type: ignore[no-untyped-def]
    reps = runs["reports"]
    md = (full.output / "report.md").read_text()
    assert md.startswith("# tiny comparison")
    assert [r.label for r in full.runs] == ["sweep-wanda/sparsity-0.3", "sweep-wanda/sparsity-0.6", "mag", "cfsp20",
                                            "cfsp40", "barber"]
    assert full.warnings == [] and "Warning" not in md
    header = _header(md)
    assert "heldout ppl @64 x2" in header and "heldout dense ppl @64 x2" in header
    labels = {"wanda30": "sweep-wanda/sparsity-0.3", "wanda60": "sweep-wanda/sparsity-0.6", "mag": "mag",
              "cfsp20": "cfsp20", "cfsp40": "cfsp40", "barber": "barber"}
    for name, label in labels.items():
        rep = reps[name]
        assert _cell(md, label, "method") == rep["method"]
        assert _cell(md, label, "heldout ppl @64 x2") == f"{rep['eval']['heldout']['ppl']:.3f}"
        dense = f"{rep['eval_dense']['heldout']['ppl']:.3f}" if "eval_dense" in rep else "—"
        assert _cell(md, label, "heldout dense ppl @64 x2") == dense
        assert _cell(md, label, "peak RSS") == f"{rep['memory']['peak_rss_mb']:,.0f} MB"
        assert _cell(md, label, "prune time") == f"{rep['timings']['prune_s']:,.1f} s"
    assert _cell(md, labels["wanda30"], "settings") == "unstructured 30%"
    assert _cell(md, labels["wanda30"], "calibration") == "calib.txt 4x32 seed 0"
    assert _cell(md, "mag", "calibration") == "none (data-free)"
    assert _cell(md, "barber", "calibration") == "calib.txt 2x32 seed 0"
    assert _cell(md, "barber", "settings") == "unstructured 50% init=wanda ratio=0.5 granularity=output"
    assert _cell(md, "cfsp20", "settings") == "channels 20% of MLP channels importance=angular score=weight_aware"
    assert _cell(md, labels["wanda60"], "sparsity (decoder linears)") == f"{100 * reps['wanda60']['sparsity']['overall']:.2f}% zeros"
    st = reps["cfsp40"]["structure"]
    assert _cell(md, "cfsp40", "parameters") == (f"{st['params']['dense']:,} → {st['params']['pruned']:,} "
                                                 f"(−{100 * st['params']['removed_fraction']:.2f}%)")
    assert f"{100 * st['mlp_channels']['removed_fraction']:.2f}% of MLP channels removed" in _cell(
        md, "cfsp40", "sparsity (decoder linears)")
    assert _cell(md, "mag", "parameters") == f"{reps['mag']['params']['total']:,}"

    page = (full.output / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    images = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(images) == len(full.plots) == 5
    for src, (spec, _) in zip(images, full.plots, strict=True):
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == (full.output / spec.file).read_bytes()
    assert not re.search(r"https?://|<link|<script|@import|url\(", page)  # self-contained
    for name, label in labels.items():
        assert f"<td>{label}</td>" in page and f"{reps[name]['eval']['heldout']['ppl']:.3f}" in page
    table = json.loads((full.output / "report.json").read_text())
    assert [r["label"] for r in table["runs"]] == [r.label for r in full.runs]


def test_plots_are_pngs_of_the_expected_series(runs: dict[str, Any], full) -> None:  # type: ignore[no-untyped-def]
    reps = runs["reports"]
    md = (full.output / "report.md").read_text()
    drawn = {spec.file: series for spec, series in full.plots}
    assert sorted(drawn) == ["barber_swaps.png", "block_importance.png", "layer_sparsity.png", "mlp_widths.png",
                             "ppl_vs_sparsity_heldout_64x2.png"]
    for spec, series in full.plots:
        _check_png(full.output / spec.file)
        assert series == spec.series  # the lines matplotlib drew are the data
        assert f"![{spec.title}]({spec.file})" in md
        for label in series:
            assert f"`{label}`" in md

    def ppl(name: str) -> float:
        return reps[name]["eval"]["heldout"]["ppl"]

    ppl_plot = drawn["ppl_vs_sparsity_heldout_64x2.png"]
    assert ppl_plot["wanda"] == ([reps["wanda30"]["sparsity"]["overall"], reps["wanda60"]["sparsity"]["overall"]],
                                 [ppl("wanda30"), ppl("wanda60")])
    assert ppl_plot["magnitude"] == ([0.5], [ppl("mag")])
    cfsp = "cfsp importance=angular score=weight_aware"
    assert ppl_plot[cfsp] == ([reps[n]["structure"]["params"]["removed_fraction"] for n in ("cfsp20", "cfsp40")],
                              [ppl("cfsp20"), ppl("cfsp40")])
    assert ppl_plot["barber init=wanda ratio=0.5 granularity=output"] == ([0.5], [ppl("barber")])
    assert ppl_plot["dense"] == ([0.0], [reps["mag"]["eval_dense"]["heldout"]["ppl"]])
    spec = next(s for s, _ in full.plots if s.file.startswith("ppl_vs"))
    assert spec.xlabel == "achieved sparsity (structured runs: removed parameter fraction)"
    drawn_ppl = [y for _, ys in ppl_plot.values() for y in ys]
    assert spec.log_y == (max(drawn_ppl) > 10 * min(drawn_ppl))  # a log axis only when values span 10x

    # Per-layer sparsity: the unstructured runs only (structured runs remove channels, they hold no zeros).
    layers = drawn["layer_sparsity.png"]
    assert list(layers) == ["sweep-wanda/sparsity-0.3", "sweep-wanda/sparsity-0.6", "mag", "barber"]
    assert layers["barber"] == ([0.0, 1.0, 2.0], [layer["sparsity"] for layer in reps["barber"]["sparsity"]["layers"]])
    for name in ("cfsp20", "cfsp40"):
        st = reps[name]["structure"]
        assert drawn["block_importance.png"][name] == ([0.0, 1.0, 2.0], st["block_importance"]["values"])
        assert drawn["mlp_widths.png"][name] == ([0.0, 1.0, 2.0], [float(w) for w in st["mlp_channels"]["widths"]])
    assert drawn["mlp_widths.png"]["dense width"] == ([0.0, 1.0, 2.0], [128.0] * 3)
    swaps = [float(sum(layer["swaps"].values())) for layer in reps["barber"]["layers"]]
    assert drawn["barber_swaps.png"] == {"barber": ([0.0, 1.0, 2.0], swaps)} and sum(swaps) > 0


def test_different_eval_settings_get_their_own_columns_and_a_warning(runs: dict[str, Any], tmp_path: Path) -> None:
    """A run evaluated at seqlen 64 and an ``llmprune eval --json`` at seqlen 32: never one column."""
    wanda = runs["folders"]["wanda30"]
    result = build_report([wanda, runs["dense32"]], tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    page = (tmp_path / "r" / "report.html").read_text()
    dense32 = json.loads(runs["dense32"].read_text())
    assert _cell(md, "sparsity-0.3", "heldout ppl @64 x2") == f"{runs['reports']['wanda30']['eval']['heldout']['ppl']:.3f}"
    assert _cell(md, "sparsity-0.3", "heldout ppl @32 x2") == "—"
    assert _cell(md, "dense-eval32", "heldout ppl @32 x2") == f"{dense32['eval']['heldout']['ppl']:.3f}"
    assert _cell(md, "dense-eval32", "heldout ppl @64 x2") == "—"
    assert _cell(md, "dense-eval32", "method") == "eval"
    assert len(result.warnings) == 1
    warning = result.warnings[0]
    assert warning.startswith("heldout perplexity was measured under 2 different settings")
    assert "seqlen 64 x 2 windows (sparsity-0.3)" in warning and "seqlen 32 x 2 windows (dense-eval32)" in warning
    assert f"> **Warning:** {warning}" in md
    assert '<div class="warning">' in page and "seqlen 32 x 2 windows (dense-eval32)" in page
    # One perplexity plot per setting, each with only the runs measured under it.
    ppl_plots = {spec.file: series for spec, series in result.plots if spec.file.startswith("ppl_vs")}
    assert set(ppl_plots) == {"ppl_vs_sparsity_heldout_64x2.png", "ppl_vs_sparsity_heldout_32x2.png"}
    assert set(ppl_plots["ppl_vs_sparsity_heldout_32x2.png"]) == {"eval"}
    assert set(ppl_plots["ppl_vs_sparsity_heldout_64x2.png"]) == {"wanda", "dense"}


def test_runs_of_different_models_are_flagged(runs: dict[str, Any], tmp_path: Path) -> None:
    """An ``llmprune eval`` of another model next to a prune run: one warning naming both models. (An eval
    of a run folder is compared as that run, beside its base model: test_eval_of_a_run_folder_...)"""
    wanda = runs["folders"]["wanda60"]
    other = save_tiny(tmp_path / "other-tiny")
    rep = llmprune.evaluate(str(other), datasets=str(runs["heldout"]), seqlen=64, windows=2)
    write_json_atomic(tmp_path / "eval-other.json", rep)
    result = build_report([wanda, tmp_path / "eval-other.json"], tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert len(result.warnings) == 1 and result.warnings[0].startswith("runs differ in model:")
    # Reports name models as published (no local paths): the base model's folder, the other folder.
    assert f"{runs['model'].name} (sparsity-0.6)" in result.warnings[0] and "other-tiny (eval-other)" in result.warnings[0]
    assert f"> **Warning:** {result.warnings[0]}" in md
    # In the plot each line names its model.
    (series,) = [series for spec, series in result.plots if spec.file.startswith("ppl_vs")]
    assert set(series) == {f"{runs['model'].name}: wanda", "other-tiny: eval"}


def test_lines_split_by_calibration(runs: dict[str, Any]) -> None:
    """Runs of one method calibrated differently are different lines (labelled with their calibration)."""
    reports = runs["reports"]
    other = copy.deepcopy(reports["wanda60"])
    other["calibration"]["nsamples"] = 128
    group = [Run("a", Path("a"), reports["wanda30"]), Run("b", Path("b"), other), Run("c", Path("c"), reports["mag"])]
    assert line_labels(group) == {"a": "wanda [calib calib.txt 4x32 seed 0]", "b": "wanda [calib calib.txt 128x32 seed 0]",
                                  "c": "magnitude"}
    assert line_labels(group[:1] + group[2:]) == {"a": "wanda", "c": "magnitude"}


def _zeroshot(boolq: float, rte: float, shots: int = 0, rte_version: str = "1.0") -> dict[str, Any]:
    tasks = {"boolq": {"acc": boolq, "acc_stderr": 0.01, "acc_norm": None, "acc_norm_stderr": None, "samples": 100,
                       "version": "2.0"},
             "rte": {"acc": rte, "acc_stderr": 0.02, "acc_norm": rte + 0.01, "acc_norm_stderr": 0.02, "samples": 50,
                     "version": rte_version}}
    return {"tasks": tasks, "mean": {"acc": (boolq + rte) / 2, "acc_norm": None},
            "settings": {"num_fewshot": shots, "limit": 100, "batch_size": 1, "seed": 0}, "versions": {"lm_eval": "0.4.8"}}


def _with_zeroshot(runs: dict[str, Any], folder: Path, specs: dict[str, dict[str, Any]]) -> list[Path]:
    """Real run reports with a ``zeroshot`` block added (the format ``llmprune eval`` writes), as JSON files."""
    paths = []
    for name, zs in specs.items():
        rep = copy.deepcopy(runs["reports"][name])
        rep["zeroshot"] = zs
        write_json_atomic(folder / name / "llmprune.json", rep)
        paths.append(folder / name)
    return paths


def test_zeroshot_columns(runs: dict[str, Any], tmp_path: Path) -> None:
    paths = _with_zeroshot(runs, tmp_path / "same", {"wanda30": _zeroshot(0.62, 0.55), "mag": _zeroshot(0.60, 0.51)})
    result = build_report(paths, tmp_path / "r1")
    md = (tmp_path / "r1" / "report.md").read_text()
    assert result.warnings == []
    assert _cell(md, "wanda30", "boolq acc") == "0.6200"
    assert _cell(md, "mag", "rte acc") == "0.5100 (norm 0.5200)"
    assert _cell(md, "wanda30", "mean acc") == "0.5850"
    assert "zero-shot: 0-shot, limit 100, lm-eval 0.4.8 (wanda30, mag)" in md
    drawn = {spec.file: series for spec, series in result.plots}
    x_wanda = runs["reports"]["wanda30"]["sparsity"]["overall"]
    assert drawn["mean_acc_vs_sparsity.png"] == {"wanda": ([x_wanda], [(0.62 + 0.55) / 2]),
                                                "magnitude": ([0.5], [(0.60 + 0.51) / 2])}
    _check_png(tmp_path / "r1" / "mean_acc_vs_sparsity.png")

    # Different num_fewshot and a different rte task version: split columns, each named, and warnings.
    paths = _with_zeroshot(runs, tmp_path / "diff", {"wanda30": _zeroshot(0.62, 0.55),
                                                     "mag": _zeroshot(0.60, 0.51, shots=5),
                                                     "cfsp20": _zeroshot(0.58, 0.50, rte_version="2.0")})
    result = build_report(paths, tmp_path / "r2")
    md = (tmp_path / "r2" / "report.md").read_text()
    zero, five = "0-shot, limit 100, lm-eval 0.4.8", "5-shot, limit 100, lm-eval 0.4.8"
    assert _cell(md, "wanda30", f"boolq acc [{zero}]") == "0.6200"
    assert _cell(md, "wanda30", f"boolq acc [{five}]") == "—"
    assert _cell(md, "mag", f"boolq acc [{five}]") == "0.6000"
    assert _cell(md, "wanda30", f"rte acc (v1.0) [{zero}]") == "0.5500 (norm 0.5600)"
    assert _cell(md, "cfsp20", f"rte acc (v2.0) [{zero}]") == "0.5000 (norm 0.5100)"
    assert _cell(md, "cfsp20", f"rte acc (v1.0) [{zero}]") == "—"
    assert _cell(md, "mag", f"mean acc [{five}]") == "0.5550"
    assert _header(md)[7:12] == [f"boolq acc [{zero}]", f"boolq acc [{five}]", f"rte acc (v1.0) [{zero}]",
                                 f"rte acc [{five}]", f"rte acc (v2.0) [{zero}]"]  # one task's columns together
    # The means of wanda30 and cfsp20 average different rte versions: one mean column each.
    assert _cell(md, "wanda30", f"mean acc (2 tasks: boolq v2.0, rte v1.0) [{zero}]") == "0.5850"
    assert _cell(md, "cfsp20", f"mean acc (2 tasks: boolq v2.0, rte v1.0) [{zero}]") == "—"
    assert _cell(md, "cfsp20", f"mean acc (2 tasks: boolq v2.0, rte v2.0) [{zero}]") == "0.5400"
    assert len(result.warnings) == 3
    assert result.warnings[0].startswith("zero-shot accuracy was measured under 2 different settings")
    assert f"{zero} (wanda30, cfsp20)" in result.warnings[0] and f"{five} (mag)" in result.warnings[0]
    assert result.warnings[1].startswith("zero-shot task rte was measured under 2 different settings")
    assert result.warnings[2].startswith("mean zero-shot accuracy averages different tasks or task versions")
    # One accuracy plot per comparable mean: never two settings or task versions on one axis.
    acc_plots = [series for spec, series in result.plots if spec.file.startswith("mean_acc")]
    assert [set(series) for series in acc_plots] == [{"wanda"}, {"magnitude"}, {"cfsp importance=angular score=weight_aware"}]
    for warning in result.warnings:
        assert f"> **Warning:** {warning}" in md


def test_zeroshot_dense_columns_and_point(runs: dict[str, Any], tmp_path: Path) -> None:
    """``zeroshot_dense`` (before pruning) gets its own columns and the dense point of the accuracy plot."""
    dense = _zeroshot(0.70, 0.60)
    wanda = copy.deepcopy(runs["reports"]["wanda30"])
    wanda["zeroshot"], wanda["zeroshot_dense"] = _zeroshot(0.62, 0.55), dense
    write_json_atomic(tmp_path / "wanda30" / "llmprune.json", wanda)
    result = build_report([tmp_path / "wanda30"], tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert result.warnings == []
    assert _header(md)[7:13] == ["boolq dense acc", "boolq acc", "rte dense acc", "rte acc", "mean dense acc",
                                 "mean acc"]
    assert _cell(md, "wanda30", "boolq dense acc") == "0.7000" and _cell(md, "wanda30", "boolq acc") == "0.6200"
    assert _cell(md, "wanda30", "mean dense acc") == f"{(0.70 + 0.60) / 2:.4f}"
    drawn = {spec.file: series for spec, series in result.plots}
    assert drawn["mean_acc_vs_sparsity.png"] == {"wanda": ([wanda["sparsity"]["overall"]], [(0.62 + 0.55) / 2]),
                                                "dense": ([0.0], [(0.70 + 0.60) / 2])}


def test_unfinished_sweep_points_are_left_out_with_a_warning(runs: dict[str, Any], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep-cut"
    write_json_atomic(sweep / "sparsity-0.3" / "llmprune.json", runs["reports"]["wanda30"])
    points = [{"value": 0.3, "folder": "sparsity-0.3", "status": "done"},
              {"value": 0.6, "folder": "sparsity-0.6", "status": "pending"}]
    write_json_atomic(sweep / "sweep.json", {"sweep": {}, "complete": False, "points": points})
    result = build_report([sweep], tmp_path / "r")
    assert [r.label for r in result.runs] == ["sweep-cut/sparsity-0.3"]
    assert result.warnings == ["sweep sweep-cut is not finished; its unfinished points are left out: sparsity-0.6"]
    assert f"> **Warning:** {result.warnings[0]}" in (tmp_path / "r" / "report.md").read_text()
    points[0]["status"] = "pending"
    write_json_atomic(sweep / "sweep.json", {"sweep": {}, "complete": False, "points": points})
    with pytest.raises(LLMPruneError, match="has no finished point yet"):
        build_report([sweep], tmp_path / "r2")


def test_bad_input_is_refused_before_writing(runs: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMPruneError, match="has no llmprune.json; it is not an llmprune run folder"):
        build_report([runs["folders"]["mag"], tmp_path / "empty"], out)
    with pytest.raises(LLMPruneError, match="does not exist"):
        build_report([tmp_path / "missing"], out)
    (tmp_path / "other.json").write_text('{"results": {}}')
    with pytest.raises(LLMPruneError, match="not an llmprune report"):
        build_report([tmp_path / "other.json"], out)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(LLMPruneError, match="not valid JSON"):
        build_report([tmp_path / "broken.json"], out)
    sweep = tmp_path / "sweep"
    write_json_atomic(sweep / "sweep.json", {"sweep": {}, "points": [{"value": 0.1, "folder": "sparsity-0.1"}]})
    with pytest.raises(LLMPruneError, match="sparsity-0.1 has no llmprune.json"):
        build_report([sweep], out)
    with pytest.raises(LLMPruneError, match="at least one"):
        build_report([], out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "broken.json", "empty", "other.json", "sweep"]


def test_existing_output_needs_overwrite(runs: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_report([runs["folders"]["mag"]], out)
    before = (out / "report.md").read_text()
    with pytest.raises(LLMPruneError, match="already exists"):
        build_report([runs["folders"]["cfsp20"]], out)
    assert (out / "report.md").read_text() == before
    build_report([runs["folders"]["cfsp20"]], out, overwrite=True)
    assert "| cfsp20 |" in (out / "report.md").read_text() and "| mag |" not in (out / "report.md").read_text()
    assert (out / "mlp_widths.png").is_file() and not (out / "layer_sparsity.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left
    # A report never replaces the runs it reads, even with overwrite.
    with pytest.raises(LLMPruneError, match="would replace the input"):
        build_report([runs["folders"]["cfsp20"]], runs["folders"]["cfsp20"], overwrite=True)
    with pytest.raises(LLMPruneError, match="would replace the input"):
        build_report([runs["sweep"]], runs["sweep"], overwrite=True)
    assert (runs["folders"]["cfsp20"] / "model.safetensors").is_file() and (runs["sweep"] / "sweep.json").is_file()


def test_missing_matplotlib_is_a_clear_error(runs: dict[str, Any], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(LLMPruneError, match=r"pip install 'llmprune\[report\]'"):
        build_report([runs["folders"]["mag"]], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_report(runs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.console, "width", 200)  # a wide terminal: no folded cells to search through
    out = tmp_path / "cli-report"
    args = ["report", str(runs["sweep"]), str(runs["folders"]["cfsp20"]), "--output", str(out), "--title", "CLI run"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "3 runs compared" in result.output and f"report written to {out}:" in result.output
    for text in ("sweep-wanda/sparsity-0.3", "sweep-wanda/sparsity-0.6", "cfsp20", "heldout ppl @64 x2",
                 f"{runs['reports']['cfsp20']['eval']['heldout']['ppl']:.3f}", "report.html", "report.md",
                 "ppl_vs_sparsity_heldout_64x2.png", "mlp_widths.png"):
        assert text in result.output, text
    assert (out / "report.md").read_text().startswith("# CLI run")
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(app, ["report", str(tmp_path), "--output", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not an llmprune run folder" in bad.output and not (tmp_path / "x").exists()


def test_cpu_model_names_the_vector_extensions(monkeypatch: pytest.MonkeyPatch) -> None:
    cpuinfo = "processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16\n"
    monkeypatch.setattr(report_module, "open", lambda *a, **k: io.StringIO(cpuinfo), raising=False)
    assert report_module.cpu_model() == "Example CPU 9000 (avx512f, amx_bf16, avx2)"

    def missing(*a: object, **k: object) -> None:
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr(report_module, "open", missing, raising=False)
    monkeypatch.setattr(report_module.platform, "processor", lambda: "arm")
    assert report_module.cpu_model() == "arm"


def test_eval_of_a_run_folder_is_compared_as_that_run(runs: dict[str, Any], tmp_path: Path) -> None:
    """`llmprune eval RUN_DIR --json` carries the run's record: `report` places a structured run at its
    removed parameter fraction, with its method and settings, beside its base model (no model warning)."""
    from llmprune.reporting.plots import achieved_x

    folders, reps = runs["folders"], runs["reports"]
    res = runner.invoke(app, ["eval", "--model", str(folders["cfsp20"]), "--eval", str(runs["heldout"]),
                              "--eval-seqlen", "64", "--eval-windows", "2", "--json", str(tmp_path / "cfsp20-eval.json")])
    assert res.exit_code == 0, res.output
    assert "structured run (cfsp on tiny)" in res.output
    ev = json.loads((tmp_path / "cfsp20-eval.json").read_text())
    assert ev["run"]["method"] == "cfsp" and ev["run"]["base_model"] == reps["cfsp20"]["model"]
    assert ev["eval"]["heldout"]["ppl"] == pytest.approx(reps["cfsp20"]["eval"]["heldout"]["ppl"], rel=1e-6)
    mag_eval = llmprune.evaluate(str(folders["mag"]), datasets=str(runs["heldout"]), seqlen=64, windows=2)
    write_json_atomic(tmp_path / "mag-eval.json", mag_eval)
    result = build_report([folders["wanda30"], tmp_path / "cfsp20-eval.json", tmp_path / "mag-eval.json"],
                          tmp_path / "report")
    assert result.warnings == []  # same base model: no "runs differ in model"
    md = (result.output / "report.md").read_text()
    assert _cell(md, "cfsp20-eval", "method") == "cfsp"
    assert _cell(md, "cfsp20-eval", "settings") == "channels 20% of MLP channels importance=angular score=weight_aware"
    assert _cell(md, "mag-eval", "method") == "magnitude"
    by_label = {r.label: r for r in result.runs}
    st = reps["cfsp20"]["structure"]["params"]
    assert achieved_x(by_label["cfsp20-eval"]) == pytest.approx(st["removed_fraction"]) and st["removed_fraction"] > 0
    assert achieved_x(by_label["mag-eval"]) == pytest.approx(reps["mag"]["sparsity"]["overall"])
    # a plain model's evaluation stays an evaluation of its own
    plain = [r for r in collect(runs["dense32"])][0]
    assert plain.is_eval and plain.method == "eval"


def collect(path: Path) -> list[Run]:
    from llmprune.reporting.load import collect_runs

    return collect_runs([path])
