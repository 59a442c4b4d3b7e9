"""``llmprune sweep``: one run per point, shared calibration where the method allows, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import llmprune
import llmprune.sweeps as sweep_mod
from llmprune.cli import app
from llmprune.errors import LLMPruneError
from llmprune.sweeps import SWEEP_NAME, parse_values, sweep

runner = CliRunner()


def _args(calib: Path, data_dir: Path, **kw: object) -> dict:
    args = dict(calib_dataset=str(calib), nsamples=4, seqlen=32, data_dir=str(data_dir), eval="wikitext2",
                eval_seqlen=64, eval_windows=2)
    args.update(kw)
    return args


def test_parse_values() -> None:
    assert parse_values("0.3, 0.5,0.7") == [0.3, 0.5, 0.7]
    assert parse_values("block,layer") == ["block", "layer"]
    with pytest.raises(LLMPruneError, match="repeat"):
        parse_values("0.5,0.5")
    with pytest.raises(LLMPruneError, match="at least one"):
        parse_values("")


def test_sweep_one_run_per_point_monotone_sparsity(tiny_model_dir, calib_file: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    res = sweep(str(tiny_model_dir("llama")), values=[0.2, 0.4, 0.6], method="wanda", output=str(out),
                **_args(calib_file, data_dir))
    index = json.loads((out / SWEEP_NAME).read_text())
    assert index["complete"] is True and [p["status"] for p in index["points"]] == ["done"] * 3
    assert index["sweep"]["parameter"] == "method.sparsity" and index["sweep"]["values"] == [0.2, 0.4, 0.6]
    folders = [p["folder"] for p in index["points"]]
    assert folders == ["sparsity-0.2", "sparsity-0.4", "sparsity-0.6"]
    reports = [json.loads((out / f / "llmprune.json").read_text()) for f in folders]
    achieved = [r["sparsity"]["overall"] for r in reports]
    assert achieved == sorted(achieved) and len(set(achieved)) == 3
    assert [r["recipe"]["method"]["sparsity"] for r in reports] == [0.2, 0.4, 0.6]
    assert all((out / f / "model.safetensors").is_file() for f in folders)
    # The dense model is evaluated once and its numbers are carried into every point.
    assert len({json.dumps(r["eval_dense"]) for r in reports}) == 1
    assert [r["sweep"]["value"] for r in res.reports] == [0.2, 0.4, 0.6]
    # Every point equals a separate run with the same settings (sparsity 0.4 here).
    single = llmprune.prune(str(tiny_model_dir("llama")), method="wanda", sparsity=0.4, **_args(calib_file, data_dir))
    reloaded = llmprune.load(out / "sparsity-0.4", dtype="float32", device="cpu")[0]
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), single.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_structured_sweep_shares_one_calibration_pass(tiny_model_dir, calib_file: Path, data_dir: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = llmprune.api.run_layerwise

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(llmprune.api, "run_layerwise", counting)
    out = tmp_path / "cfsp"
    res = sweep(str(tiny_model_dir("qwen2")), values="0.2,0.5", method="cfsp", output=str(out), save_models=False,
                **_args(calib_file, data_dir, eval=None))
    assert len(calls) == 1
    assert [r.get("statistics_reused", False) for r in res.reports] == [False, True]
    assert not (out / "sparsity-0.5" / "model.safetensors").exists()  # --reports-only
    removed = [r["structure"]["mlp_channels"]["removed_fraction"] for r in res.reports]
    assert removed[0] < removed[1]
    single = llmprune.prune(str(tiny_model_dir("qwen2")), method="cfsp", sparsity=0.5, **_args(calib_file, data_dir, eval=None))
    assert single.report["structure"]["mlp_channels"]["widths"] == res.reports[1]["structure"]["mlp_channels"]["widths"]


def test_interrupted_sweep_resumes(tiny_model_dir, calib_file: Path, data_dir: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model = str(tiny_model_dir("llama"))
    out = tmp_path / "sweep"
    real = sweep_mod._execute
    seen = []

    def dies_on_second(plan, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(plan.recipe.method.sparsity)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(sweep_mod, "_execute", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        sweep(model, values="0.3,0.6", method="magnitude", output=str(out), data_dir=str(data_dir))
    index = json.loads((out / SWEEP_NAME).read_text())
    assert index["complete"] is False and [p["status"] for p in index["points"]] == ["done", "pending"]
    assert not (out / "sparsity-0.6").exists()  # nothing half-written
    first = (out / "sparsity-0.3" / "llmprune.json").read_text()

    with pytest.raises(LLMPruneError, match="already exists.*--resume"):
        sweep(model, values="0.3,0.6", method="magnitude", output=str(out), data_dir=str(data_dir))
    with pytest.raises(LLMPruneError, match="other settings"):
        sweep(model, values="0.3,0.7", method="magnitude", output=str(out), data_dir=str(data_dir), resume=True)
    monkeypatch.setattr(sweep_mod, "_execute", real)
    res = sweep(model, values="0.3,0.6", method="magnitude", output=str(out), data_dir=str(data_dir), resume=True)
    index = json.loads((out / SWEEP_NAME).read_text())
    assert index["complete"] is True
    assert (out / "sparsity-0.3" / "llmprune.json").read_text() == first  # not redone
    assert [r["sweep"]["value"] for r in res.reports] == [0.3, 0.6]


def test_overwrite_replaces_only_when_complete(tiny_model_dir, data_dir: Path, tmp_path: Path) -> None:
    model = str(tiny_model_dir("opt"))
    out = tmp_path / "sweep"
    sweep(model, values="0.5", method="magnitude", output=str(out), data_dir=str(data_dir))
    sweep(model, values="0.25,0.5", method="magnitude", output=str(out), data_dir=str(data_dir), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["sparsity-0.25", "sparsity-0.5", SWEEP_NAME]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sweep")]
    # The report names the point's folder, neither the temporary folder it was built in nor any local path.
    text = (out / "sparsity-0.25" / "llmprune.json").read_text()
    assert json.loads(text)["recipe"]["output"] is None and json.loads(text)["sweep"]["folder"] == "sparsity-0.25"
    assert ".sweep" not in text and str(tmp_path) not in text


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"values": "0.3,1.5"}, "sparsity"),
    ({"values": "0.3", "parameter": "model.name"}, "cannot sweep model.name"),
    ({"values": "0.3", "output": None}, "needs an output folder"),
    ({"values": "0.3", "parameter": "method.no_such_option"}, "no_such_option"),
])
def test_bad_sweeps_fail_before_any_work(kwargs: dict, message: str, data_dir: Path, tmp_path: Path) -> None:
    args = {"method": "magnitude", "output": str(tmp_path / "never"), "data_dir": str(data_dir), **kwargs}
    with pytest.raises(LLMPruneError, match=message):
        sweep(str(tmp_path / "no-model-needed"), **args)
    assert not (tmp_path / "never").exists()


def test_cli_sweep(tiny_model_dir, calib_file: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-sweep"
    args = ["sweep", "--model", str(tiny_model_dir("gemma2")), "--method", "sparsegpt", "--sparsities", "0.25,0.5",
            "--calib-dataset", str(calib_file), "--nsamples", "2", "--seqlen", "32", "--data-dir", str(data_dir),
            "--eval", "wikitext2", "--eval-seqlen", "64", "--eval-windows", "1", "--output", str(out),
            "--reports-only", "--set", "method.block_size=16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "sweep of method.sparsity" in result.output and "sparsity-0.25" in result.output
    assert "dense: wikitext2 ppl" in result.output
    rep = json.loads((out / "sparsity-0.5" / "llmprune.json").read_text())
    assert rep["recipe"]["method"]["block_size"] == 16
    bad = runner.invoke(app, ["sweep", "--method", "wanda", "--output", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--sparsities" in bad.output
