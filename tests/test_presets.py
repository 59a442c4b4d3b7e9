"""``--preset best`` / ``--preset faithful``: the shipped files, the benchmark rows that back them, runs
end to end on a tiny model, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import llmprune
from llmprune.cli import app
from llmprune.errors import LLMPruneError
from llmprune.presets import BEST_DIR, apply_preset, best_presets, setting_of
from llmprune.recipe import build_recipe

REPO = Path(__file__).resolve().parents[1]
TIME_BUDGET, RSS_BUDGET = 4.0, 1.5  # issue 30: <= 4 x our Wanda's pruning time, <= 1.5 x its peak RSS
runner = CliRunner()


def _setting_of_row(row: dict) -> str:
    return setting_of({"pattern": row["pattern"], "sparsity": row.get("target", 0.5)})


def _request(method: dict) -> dict:
    return {k: v for k, v in method.items() if k not in ("name", "sparsity", "pattern")}


def test_the_presets_ship_in_the_package_and_the_repository_links_them() -> None:
    assert {"unstructured50", "2of4"} <= set(best_presets())
    assert (REPO / "recipes" / "best").resolve() == BEST_DIR.resolve()
    assert "presets/best/*.yaml" in (REPO / "pyproject.toml").read_text()  # package data: in the wheel too


@pytest.mark.parametrize("setting", sorted(best_presets()))
def test_each_preset_is_the_best_admissible_row_of_its_benchmark(setting: str) -> None:
    """Chosen by benchmark: among our rows at its setting in its file that keep to the issue's budget
    (time and peak RSS against our Wanda in the same file), the preset's row has the lowest perplexity."""
    preset = best_presets()[setting]
    rows = [r for r in json.loads((REPO / preset["benchmark"]).read_text())["runs"]
            if r["tool"] == "llmprune" and _setting_of_row(r) == setting]
    wanda = [r for r in rows if r["method"] == "wanda" and not r.get("request")]
    assert len(wanda) == 1, f"{preset['benchmark']} needs one plain Wanda row at {setting} as the budget's reference"
    admissible = [r for r in rows if r["prune_s"] <= TIME_BUDGET * wanda[0]["prune_s"]
                  and r["peak_rss_mb"] <= RSS_BUDGET * wanda[0]["peak_rss_mb"]]
    best = min(admissible, key=lambda r: r["wikitext2"]["ppl"])
    assert (best["method"], best.get("request") or {}) == (preset["method"]["name"], _request(preset["method"]))
    assert setting_of(preset["method"]) == setting  # the file's name says what it is for


def test_best_fills_in_under_the_users_values() -> None:
    rec = build_recipe({}, {"method.pattern": "2:4"}, [("method.ratio", 0.05)], preset="best")
    chosen = best_presets()["2of4"]["method"]
    assert rec.method.name == chosen["name"]
    assert rec.method.options["ratio"] == 0.05  # --set wins over the preset
    assert rec.method.options["reconstruct_solver"] == chosen["reconstruct_solver"]
    assert build_recipe({}, {}, None, preset="best").method.options == _request(best_presets()["unstructured50"]["method"])


def test_faithful_is_method_faithful() -> None:
    rec = build_recipe({}, {"method.name": "sparsegpt"}, None, preset="faithful")
    assert rec.method.options == build_recipe({}, {"method.name": "sparsegpt", "method.faithful": True}).method.options


@pytest.mark.parametrize(("name", "fields", "message"), [
    ("bestest", {}, "unknown preset 'bestest' \\(did you mean best\\?\\)"),
    ("best", {"method.sparsity": 0.55}, "no measured configuration for 55%.*measured: .*50%"),
    ("best", {"method.pattern": "1:8"}, "no measured configuration for 1:8"),
    ("best", {"method.name": "wanda"}, "chooses the method for 50% \\(barber\\); drop --method wanda"),
    ("faithful", {}, "--preset faithful needs one of .*wanda.*got no method"),
    ("faithful", {"method.name": "magnitude"}, "got method 'magnitude'"),
    ("faithful", {"method.name": "wanda", "method.faithful": False}, "drop method.faithful=false"),
])
def test_bad_presets_are_refused(name: str, fields: dict, message: str) -> None:
    with pytest.raises(LLMPruneError, match=message):
        apply_preset(name, build_dict(fields))


def build_dict(fields: dict) -> dict:
    data: dict = {}
    for key, value in fields.items():
        section, field = key.split(".")
        data.setdefault(section, {})[field] = value
    return data


@pytest.mark.parametrize("setting", sorted(best_presets()))
def test_best_presets_run_end_to_end_on_a_tiny_model(setting: str, tiny_model_dir, calib_file: Path,
                                                     data_dir: Path, tmp_path: Path) -> None:
    method = best_presets()[setting]["method"]
    target = {"pattern": method["pattern"]} if "pattern" in method else {"sparsity": method["sparsity"]}
    out = tmp_path / "out"
    result = llmprune.prune(str(tiny_model_dir("llama")), preset="best", calib_dataset=str(calib_file), nsamples=4,
                            seqlen=32, data_dir=str(data_dir), output=str(out), **target)
    rep = json.loads((out / "llmprune.json").read_text())
    assert rep["recipe"]["method"]["name"] == method["name"]
    assert {k: rep["recipe"]["method"][k] for k in _request(method)} == _request(method)
    expected = 1 - int(method["pattern"][0]) / int(method["pattern"][2]) if "pattern" in method else method["sparsity"]
    assert rep["sparsity"]["overall"] == pytest.approx(expected, abs=1e-3)
    assert result.report["sparsity"]["overall"] == rep["sparsity"]["overall"]


def test_cli_preset_best_needs_no_method_and_refuses_an_unknown_preset(tiny_model_dir, calib_file: Path,
                                                                       data_dir: Path, tmp_path: Path) -> None:
    folder = str(tiny_model_dir("llama"))
    common = ["prune", "--model", folder, "--calib-dataset", str(calib_file), "--nsamples", "2", "--seqlen", "16",
              "--data-dir", str(data_dir)]
    bad = runner.invoke(app, [*common, "--preset", "nope", "--output", str(tmp_path / "a")])
    assert bad.exit_code == 2 and "unknown preset 'nope'" in bad.output and not (tmp_path / "a").exists()
    bad = runner.invoke(app, [*common, "--preset", "best", "--sparsity", "0.33", "--output", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "no measured configuration for 33%" in bad.output and not (tmp_path / "b").exists()
    ok = runner.invoke(app, [*common, "--preset", "best", "--pattern", "2:4", "--output", str(tmp_path / "c")])
    assert ok.exit_code == 0, ok.output
    rep = json.loads((tmp_path / "c" / "llmprune.json").read_text())
    assert rep["recipe"]["method"]["name"] == best_presets()["2of4"]["method"]["name"]
