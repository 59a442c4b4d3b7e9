"""Streaming (one decoder layer at a time from the shards) equals in-memory pruning; resume; bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llmprune
from llmprune.engine.streaming import OBSERVE_PROGRESS_NAME, PROGRESS_NAME, partial_dir
from llmprune.errors import LLMPruneError

from .conftest import FAMILIES, byte_level_tokenizer, save_tiny, tiny_model


def sharded_model(root: Path, family: str = "llama", layers: int = 3, shard: str = "40KB") -> Path:
    """A tiny model saved in several safetensors shards (with an index) and a byte-level tokenizer."""
    return save_tiny(root / f"src-{family}-{layers}", family, num_hidden_layers=layers, max_shard_size=shard, **(
        {"layer_types": ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)}
        if family == "gemma3" else {}))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint, by name, straight from its safetensors files."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key


def prune_args(calib: Path, **kw: object) -> dict[str, object]:
    args: dict[str, object] = dict(method="wanda", sparsity=0.5, calib_dataset=str(calib), nsamples=4, seqlen=32)
    args.update(kw)
    return args


@pytest.mark.parametrize("family", list(FAMILIES))
def test_streamed_equals_in_memory_every_family(family: str, calib_file: Path, tmp_path: Path) -> None:
    src = sharded_model(tmp_path, family)
    assert len(list(src.glob("*.safetensors"))) > 2  # really sharded
    mem = llmprune.prune(str(src), output=str(tmp_path / "mem"), stream="off", **prune_args(calib_file))
    out = tmp_path / "str"
    st = llmprune.prune(str(src), output=str(out), stream="on", **prune_args(calib_file))
    assert_same_tensors(tmp_path / "mem", out)
    assert st.report["sparsity"] == mem.report["sparsity"]
    assert [r["sparsity"] for r in st.report["layers"]] == [r["sparsity"] for r in mem.report["layers"]]
    assert st.report["streaming"] == {"resumed_at_layer": 0, "layers": 3} and "streaming" not in mem.report
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    assert not partial_dir(out).exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # A plain from_pretrained gives the same model as the in-memory result.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, mem.model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(("method", "kw"), [("magnitude", {}), ("sparsegpt", {"pattern": "2:4", "sparsity": None}),
                                            ("barber", {}), ("wanda", {"method_options": {"sequential": "linear"}}),
                                            ("sparsegpt", {"method_options": {"sequential": "linear"}})])
def test_streamed_equals_in_memory_methods(method: str, kw: dict, calib_file: Path, tmp_path: Path) -> None:
    src = sharded_model(tmp_path, "qwen2")
    args = prune_args(calib_file, method=method, **kw)
    mem = llmprune.prune(str(src), output=str(tmp_path / "mem"), stream="off", **args)
    st = llmprune.prune(str(src), output=str(tmp_path / "str"), stream="on", **args)
    assert_same_tensors(tmp_path / "mem", tmp_path / "str")
    assert st.report["sparsity"] == mem.report["sparsity"]


STRUCTURED = [
    ("llama", "cfsp", {}),
    ("qwen2", "flap", {}),  # widths differ per layer, and every layer gains an output bias
    ("mistral", "wanda-sp", {"uniform": True}),  # a stock checkpoint
    ("llama", "cfsp", {"attention": 0.5, "importance": "mse"}),  # KV groups too
    ("opt", "magnitude-sp", {}),
]


@pytest.mark.parametrize(("family", "method", "opts"), STRUCTURED)
def test_structured_streamed_equals_in_memory(family: str, method: str, opts: dict, calib_file: Path,
                                              tmp_path: Path) -> None:
    src = save_tiny(tmp_path / "src", family, num_hidden_layers=3, max_shard_size="40KB",
                    **({"num_key_value_heads": 4} if "attention" in opts else {}))
    args = prune_args(calib_file, method=method, sparsity=0.3, method_options=opts)
    mem = llmprune.prune(str(src), output=str(tmp_path / "mem"), stream="off", **args)
    out = tmp_path / "str"
    st = llmprune.prune(str(src), output=str(out), stream="on", **args)
    assert_same_tensors(tmp_path / "mem", out)
    assert st.report["structure"] == mem.report["structure"]
    assert st.report["sparsity"] == mem.report["sparsity"]
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in mem.report["layers"]]
    assert [{k: v for k, v in r.items() if k != "time_s"} for r in st.report["layers"]] == strip
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "mem" / "config.json").read_text())
    assert not partial_dir(out).exists()
    reloaded, _ = llmprune.load(str(out))
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, mem.model(input_ids=ids).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("kill_at", ["observe:1", "1"])
def test_structured_killed_run_resumes_to_identical_output(kill_at: str, calib_file: Path, tmp_path: Path) -> None:
    src = save_tiny(tmp_path / "src", "llama", num_hidden_layers=4, max_shard_size="40KB")
    out = tmp_path / "out"
    cmd = ["prune", "--model", str(src), "--method", "flap", "--sparsity", "0.3", "--stream",
           "--calib-dataset", str(calib_file), "--nsamples", "4", "--seqlen", "32", "--output", str(out)]
    killed = _cli(cmd, {"LLMPRUNE_TEST_KILL_AFTER_LAYER": kill_at})
    assert killed.returncode == -9, killed.stderr[-2000:]  # killed in the observing (or the writing) pass
    work = partial_dir(out)
    assert not out.exists() and work.is_dir()
    observed = json.loads((work / OBSERVE_PROGRESS_NAME).read_text())["layers_done"]
    assert observed == (2 if kill_at.startswith("observe") else 4)
    assert (work / PROGRESS_NAME).is_file() == (not kill_at.startswith("observe"))
    resumed = _cli(cmd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = json.loads((out / "llmprune.json").read_text())
    assert report["streaming"]["resumed_at_layer"] == (0 if kill_at.startswith("observe") else 2)
    assert not work.exists() and not list(out.glob("state-*")) and not list(out.glob("progress*"))
    ref = llmprune.prune(str(src), output=str(tmp_path / "ref"), stream="off",
                         **prune_args(calib_file, method="flap", sparsity=0.3))
    assert_same_tensors(tmp_path / "ref", out)
    assert report["structure"] == ref.report["structure"]


def test_single_file_checkpoint_and_bfloat16(calib_file: Path, tmp_path: Path) -> None:
    src = sharded_model(tmp_path, "llama", shard="50MB")
    assert (src / "model.safetensors").is_file()
    args = prune_args(calib_file, dtype="bfloat16")
    llmprune.prune(str(src), output=str(tmp_path / "mem"), stream="off", **args)
    llmprune.prune(str(src), output=str(tmp_path / "str"), stream="on", **args)
    assert_same_tensors(tmp_path / "mem", tmp_path / "str")
    assert next(iter(tensors(tmp_path / "str").values())).dtype == torch.bfloat16


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    code = "import sys; from llmprune.cli import app; sys.argv = ['llmprune', *sys.argv[1:]]; app()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_killed_run_resumes_to_identical_output(calib_file: Path, tmp_path: Path) -> None:
    src = sharded_model(tmp_path, "llama", layers=4)
    out = tmp_path / "out"
    cmd = ["prune", "--model", str(src), "--method", "sparsegpt", "--sparsity", "0.5", "--stream",
           "--calib-dataset", str(calib_file), "--nsamples", "4", "--seqlen", "32", "--output", str(out)]
    killed = _cli(cmd, {"LLMPRUNE_TEST_KILL_AFTER_LAYER": "1"})
    assert killed.returncode == -9, killed.stderr[-2000:]  # really killed (SIGKILL) after layer 1 was recorded
    assert not out.exists()  # the output folder never exists half-written
    work = partial_dir(out)
    progress = json.loads((work / PROGRESS_NAME).read_text())
    assert progress["layers_done"] == 2
    # Resuming with other settings is refused and leaves the interrupted run as it was.
    with pytest.raises(LLMPruneError, match="different settings"):
        llmprune.prune(str(src), output=str(out), stream="on",
                       **prune_args(calib_file, method="sparsegpt", sparsity=0.6))
    assert json.loads((work / PROGRESS_NAME).read_text()) == progress and not out.exists()
    # Resumed, then killed again after the last layer (before the output was assembled) ...
    killed = _cli(cmd, {"LLMPRUNE_TEST_KILL_AFTER_LAYER": "3"})
    assert killed.returncode == -9 and not out.exists(), killed.stderr[-2000:]
    assert json.loads((work / PROGRESS_NAME).read_text())["layers_done"] == 4
    # ... and the third run only assembles the output.
    resumed = _cli(cmd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = json.loads((out / "llmprune.json").read_text())
    assert report["streaming"]["resumed_at_layer"] == 4 and len(report["layers"]) == 4
    assert [r["layer"] for r in report["layers"]] == [0, 1, 2, 3]
    assert not work.exists()
    ref = tmp_path / "ref"
    llmprune.prune(str(src), output=str(ref), stream="on", **prune_args(calib_file, method="sparsegpt"))
    assert_same_tensors(ref, out)
    llmprune.prune(str(src), output=str(tmp_path / "mem"), stream="off", **prune_args(calib_file, method="sparsegpt"))
    assert_same_tensors(tmp_path / "mem", out)


def test_missing_or_corrupt_shard(calib_file: Path, tmp_path: Path) -> None:
    src = sharded_model(tmp_path, "llama")
    shards = sorted(src.glob("model-*.safetensors"))
    out = tmp_path / "out"

    def run(copy: Path) -> None:
        llmprune.prune(str(copy), output=str(out), stream="on", **prune_args(calib_file))

    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    (missing / shards[1].name).unlink()
    with pytest.raises(LLMPruneError, match=f"shard .*{shards[1].name} named in .* is missing"):
        run(missing)
    truncated = tmp_path / "truncated"
    shutil.copytree(src, truncated)
    data = (truncated / shards[-1].name).read_bytes()
    (truncated / shards[-1].name).write_bytes(data[: len(data) - 100])
    with pytest.raises(LLMPruneError, match=f"shard .*{shards[-1].name} cannot be read .*corrupt"):
        run(truncated)
    garbage = tmp_path / "garbage"
    shutil.copytree(src, garbage)
    (garbage / shards[0].name).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(LLMPruneError, match=f"shard .*{shards[0].name} cannot be read"):
        run(garbage)
    assert not out.exists() and not partial_dir(out).exists()


def test_a_failed_shard_write_stops_the_run_and_resumes(calib_file: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from llmprune.engine import streaming

    src = sharded_model(tmp_path, "llama", layers=4)
    out = tmp_path / "out"
    real = streaming._save_safetensors_atomic

    def disk_full_at_layer_1(tensors: dict, path: Path, stage: object = None) -> None:
        if path.name == "layer-00001.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(tensors, path, stage)

    monkeypatch.setattr(streaming, "_save_safetensors_atomic", disk_full_at_layer_1)
    with pytest.raises(OSError, match="No space left on device"):  # raised from the writer thread
        llmprune.prune(str(src), output=str(out), stream="on", **prune_args(calib_file))
    work = partial_dir(out)
    assert not out.exists() and json.loads((work / PROGRESS_NAME).read_text())["layers_done"] == 1
    assert not (work / "layer-00001.safetensors").exists()
    monkeypatch.setattr(streaming, "_save_safetensors_atomic", real)
    resumed = llmprune.prune(str(src), output=str(out), stream="on", **prune_args(calib_file))
    assert resumed.report["streaming"]["resumed_at_layer"] == 1
    llmprune.prune(str(src), output=str(tmp_path / "mem"), stream="off", **prune_args(calib_file))
    assert_same_tensors(tmp_path / "mem", out)


def test_not_enough_disk_is_refused_before_work(calib_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = sharded_model(tmp_path, "llama")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    with pytest.raises(LLMPruneError, match="not enough disk space .* for the output: it needs about"):
        llmprune.prune(str(src), output=str(out), stream="on", **prune_args(calib_file))
    assert not out.exists() and not partial_dir(out).exists()


def test_overwrite_replaces_only_when_complete(calib_file: Path, tmp_path: Path) -> None:
    src = sharded_model(tmp_path, "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(LLMPruneError, match="already exists"):
        llmprune.prune(str(src), output=str(out), stream="on", **prune_args(calib_file))
    assert (out / "mine.txt").read_text() == "user data"
    llmprune.prune(str(src), output=str(out), stream="on", overwrite=True, **prune_args(calib_file))
    assert not (out / "mine.txt").exists() and (out / "llmprune.json").is_file()


@pytest.mark.parametrize(("kw", "message"), [
    (dict(eval="wikitext2"), "evaluate the output folder with llmprune eval"),
    (dict(output=None), "pass --output"),
])
def test_unsupported_stream_requests_fail_clearly(kw: dict, message: str, calib_file: Path, data_dir: Path,
                                                  tmp_path: Path) -> None:
    src = sharded_model(tmp_path, "llama")
    args = prune_args(calib_file, output=str(tmp_path / "out"), data_dir=str(data_dir))
    args.update(kw)
    with pytest.raises(LLMPruneError, match=message):
        llmprune.prune(str(src), stream="on", **args)
    assert not (tmp_path / "out").exists()
    with pytest.raises(LLMPruneError, match="sweeps prune in memory"):
        llmprune.sweep(str(src), values="0.3", stream="on", output=str(tmp_path / "sweep"), **prune_args(calib_file))
    model = tiny_model("llama")
    with pytest.raises(LLMPruneError, match="not a loaded model"):
        llmprune.prune(model, tokenizer=byte_level_tokenizer(), stream="on", **prune_args(calib_file))


def test_auto_streams_when_the_checkpoint_does_not_fit(calib_file: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    src = sharded_model(tmp_path, "llama")
    fits = llmprune.prune(str(src), output=str(tmp_path / "fits"), **prune_args(calib_file))
    assert "streaming" not in fits.report
    memory = namedtuple("memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(1000))
    tight = llmprune.prune(str(src), output=str(tmp_path / "tight"), **prune_args(calib_file))
    assert tight.report["streaming"]["layers"] == 3
    assert_same_tensors(tmp_path / "fits", tmp_path / "tight")


def test_shaped_model_script_writes_a_loadable_sharded_checkpoint(calib_file: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from make_shaped_model import make

    out = tmp_path / "shaped"
    info = make("llama2-7b", out, layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=300)
    assert info["layers"] == 2 and len(list(out.glob("*.safetensors"))) == 3
    assert all(t.dtype == torch.bfloat16 for t in tensors(out).values())
    args = prune_args(calib_file, dtype="bfloat16")
    llmprune.prune(str(out), output=str(tmp_path / "mem"), stream="off", **args)
    llmprune.prune(str(out), output=str(tmp_path / "str"), stream="on", **args)
    assert_same_tensors(tmp_path / "mem", tmp_path / "str")
