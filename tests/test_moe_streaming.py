"""Streaming Mixture-of-Experts checkpoints: per-expert matrices on disk, fused 3-D parameters in the model.

transformers 5 saves MoE checkpoints with one matrix per expert (Mixtral's ``block_sparse_moe.experts.N.w1``,
Qwen3-MoE's ``mlp.experts.N.gate_proj``) and fuses them while loading; a streamed run reads each layer
through the same conversion and writes it back per expert, so its folder equals an in-memory run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf

import llmprune
from llmprune.models.byte_tokenizer import byte_level_tokenizer

from .moe_families import moe_families, tiny_moe
from .test_streaming import assert_same_tensors, tensors


def save_moe(folder: Path, model_type: str, **overrides: object) -> Path:
    """A tiny MoE model saved in several shards, with the byte-level tokenizer."""
    tiny_moe(model_type, vocab_size=257, **overrides).save_pretrained(folder, max_shard_size="40KB")
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def _args(calib: Path, method: str) -> dict[str, object]:
    return dict(method=method, sparsity=0.5, calib_dataset=str(calib), nsamples=4, seqlen=32)


def _expert_reports(report: dict) -> list[dict]:  # type: ignore[type-arg]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in report["layers"]]


@pytest.mark.parametrize(("model_type", "method"), [("qwen3_moe", "wanda"), ("mixtral", "wanda"),
                                                    ("qwen3_moe", "reap"), ("gpt_oss", "reap"),
                                                    ("mixtral", "expert-frequency")])
def test_streamed_moe_equals_in_memory_and_loads_stock(model_type: str, method: str, calib_file: Path,
                                                       tmp_path: Path) -> None:
    src = save_moe(tmp_path / "src", model_type)
    if model_type != "gpt_oss":  # stored per expert (gpt-oss stores the fused tensors as they are)
        assert not any(t.dim() == 3 for t in tensors(src).values())
    mem = llmprune.prune(str(src), output=str(tmp_path / "mem"), stream="off", **_args(calib_file, method))
    st = llmprune.prune(str(src), output=str(tmp_path / "str"), stream="on", **_args(calib_file, method))
    assert st.report["streaming"]["layers"] == 2
    assert_same_tensors(tmp_path / "mem", tmp_path / "str")  # the same names, layout and values
    assert st.report["sparsity"] == mem.report["sparsity"]
    assert st.report["moe"] == mem.report["moe"] and _expert_reports(st.report) == _expert_reports(mem.report)
    assert json.loads((tmp_path / "str" / "config.json").read_text()) == json.loads(
        (tmp_path / "mem" / "config.json").read_text())
    if method != "wanda":
        assert mem.report["moe"]["experts_per_layer"] == [2]
    reloaded = getattr(tf, moe_families()[model_type]).from_pretrained(tmp_path / "str").eval()  # stock loading
    ids = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, mem.model(input_ids=ids).logits, rtol=0, atol=0)


def test_streamed_per_layer_expert_counts_equal_in_memory_and_reload(calib_file: Path, tmp_path: Path) -> None:
    """Two streamed passes (score every layer, plan, rewrite every layer) give the in-memory result."""
    src = save_moe(tmp_path / "src", "qwen3_moe")
    args = {**_args(calib_file, "reap"), "sparsity": 0.375, "method_options": {"per_layer": True}}  # 3 of 8 go
    mem = llmprune.prune(str(src), output=str(tmp_path / "mem"), stream="off", **args)
    st = llmprune.prune(str(src), output=str(tmp_path / "str"), stream="on", **args)
    kept = [r["experts"]["mlp.experts"]["kept"] for r in mem.report["layers"]]
    assert sorted(kept) == [2, 3]
    assert_same_tensors(tmp_path / "mem", tmp_path / "str")
    assert st.report["sparsity"] == mem.report["sparsity"] and st.report["moe"] == mem.report["moe"]
    assert _expert_reports(st.report) == _expert_reports(mem.report)
    config = json.loads((tmp_path / "str" / "config.json").read_text())
    assert config == json.loads((tmp_path / "mem" / "config.json").read_text())
    assert config["llmprune_structure"] == {"experts_per_layer": kept}
    assert st.report["loading"] == mem.report["loading"] and st.report["loading"]["stock_from_pretrained"] is False
    reloaded, _ = llmprune.load(str(tmp_path / "str"))
    ids = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, mem.model(input_ids=ids).logits, rtol=0, atol=0)

def test_streamed_reap_resumed_after_its_last_layer_writes_the_new_expert_count(calib_file: Path, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from llmprune.engine.streaming import StreamingStore

    src = save_moe(tmp_path / "src", "mixtral")
    out = tmp_path / "out"

    def interrupted(self: StreamingStore) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(StreamingStore, "finish", interrupted)
    with pytest.raises(KeyboardInterrupt):  # every layer written, the folder not assembled yet
        llmprune.prune(str(src), output=str(out), stream="on", **_args(calib_file, "reap"))
    monkeypatch.undo()
    resumed = llmprune.prune(str(src), output=str(out), stream="on", **_args(calib_file, "reap"))
    assert resumed.report["streaming"]["resumed_at_layer"] == 2
    llmprune.prune(str(src), output=str(tmp_path / "mem"), stream="off", **_args(calib_file, "reap"))
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 2
    assert_same_tensors(tmp_path / "mem", out)
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "mem" / "config.json").read_text())


def test_streamed_moe_holds_one_layer_at_a_time(calib_file: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read of the shards is one layer's (or the modules outside the layers), and while a layer is
    pruned every other decoder layer is on the meta device, its experts included."""
    from contextlib import contextmanager

    from llmprune.engine.streaming import StreamingStore
    from llmprune.models.shards import CheckpointLayout

    src = save_moe(tmp_path / "src", "qwen3_moe", layers=3)
    reads: list[set[str]] = []
    real: list[list[int]] = []
    load, loaded = CheckpointLayout.load, StreamingStore.loaded

    def recording_load(self, reader, names, pool=None):  # type: ignore[no-untyped-def]
        reads.append({".".join(n.split(".")[:3]) if n.startswith("model.layers.") else "outside" for n in names})
        return load(self, reader, names, pool)

    @contextmanager
    def checking_loaded(self, layer):  # type: ignore[no-untyped-def]
        with loaded(self, layer):
            real.append([i for i, m in enumerate(self.view.layer_list)
                         if any(not p.is_meta for p in m.parameters())])
            yield

    monkeypatch.setattr(CheckpointLayout, "load", recording_load)
    monkeypatch.setattr(StreamingStore, "loaded", checking_loaded)
    llmprune.prune(str(src), output=str(tmp_path / "out"), stream="on", **_args(calib_file, "reap"))
    assert reads == [{"outside"}] + [{f"model.layers.{i}"} for i in range(3)]
    assert real == [[0], [1], [2]]
