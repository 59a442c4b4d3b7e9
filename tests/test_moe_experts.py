"""Expert pruning (REAP, expert frequency) and moe.targets: scores, rewritten checkpoints, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from torch import nn

import llmprune
from llmprune.errors import LLMPruneError
from llmprune.models.moe import ExpertLinear, config_expert_counts
from llmprune.models.view import model_view

from .conftest import ByteTokenizer, tiny_model
from .moe_families import NUM_EXPERTS, moe_families, tiny_moe
from .test_moe import CORE


def _prune(model: nn.Module, calib: Path, **kw: object) -> llmprune.PruneResult:
    return llmprune.prune(model, tokenizer=ByteTokenizer(128), nsamples=2, seqlen=32, calib_dataset=str(calib), **kw)


def test_reap_saliency_is_the_router_weighted_output_norm_over_routed_tokens(calib_file: Path) -> None:
    model = tiny_moe("qwen3_moe")
    from llmprune.data.sources import resolve
    from llmprune.data.tokens import calibration_windows

    ids = calibration_windows(ByteTokenizer(128), resolve(str(calib_file), "calibration", None), 2, 32, 0)
    group = model_view(model).layers[0].experts[0]
    block_in: list[torch.Tensor] = []
    handle = group.block.register_forward_pre_hook(lambda _m, a: block_in.append(a[0].reshape(-1, a[0].shape[-1])))
    expected_reap, expected_freq = [], []
    with torch.no_grad():
        logits = torch.cat([model(input_ids=row[None], output_router_logits=True).router_logits[0] for row in ids])
        handle.remove()
        x = torch.cat(block_in)
        top_w, top_i = torch.topk(logits.softmax(-1), 2, dim=-1)
        if model.config.norm_topk_prob:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        for e in range(NUM_EXPERTS):
            token, slot = torch.where(top_i == e)
            gate, up = (x[token] @ group.module.gate_up_proj[e].T).chunk(2, dim=-1)
            out = (nn.functional.silu(gate) * up) @ group.module.down_proj[e].T
            expected_reap.append(float((top_w[token, slot] * out.norm(dim=-1)).sum() / max(len(token), 1)))
            expected_freq.append(len(token))
    for method, expected in (("reap", expected_reap), ("expert-frequency", expected_freq)):
        result = _prune(tiny_moe("qwen3_moe"), calib_file, method=method, sparsity=0.5)
        rep = result.report["layers"][0]["experts"][group.path]
        assert rep["tokens"] == expected_freq
        assert rep["saliency"] == pytest.approx(expected, abs=2e-6)
        lowest = sorted(range(NUM_EXPERTS), key=lambda e: (expected[e], e))[:2]
        assert rep["removed"] == sorted(lowest)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_removal_rewrites_experts_router_and_config_and_stock_loading_works(model_type: str, calib_file: Path,
                                                                          tmp_path: Path) -> None:
    model = tiny_moe(model_type)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    result = _prune(model, calib_file, method="reap", sparsity=0.5, output=str(tmp_path / "out"))
    view = model_view(model)
    for layer in view.layers:
        for group in layer.experts:
            keep = [e for e in range(NUM_EXPERTS)
                    if e not in result.report["layers"][layer.index]["experts"][group.path]["removed"]]
            assert len(keep) == group.num_experts == NUM_EXPERTS // 2
            prefix = f"{view.layers_path}.{layer.index}."
            rewritten = 0
            for owner, owner_path in ((group.module, group.path), (group.router, group.router_path)):
                for name, tensor in list(owner.named_parameters(recurse=False)) + list(owner.named_buffers(recurse=False)):
                    full = f"{prefix}{owner_path}.{name}"
                    assert tensor.shape[0] == len(keep), full
                    assert torch.equal(tensor, before[full][keep]), full
                    rewritten += 1
            assert rewritten >= 3  # expert weights and router rows (+ biases, e_score_correction_bias)
            assert group.top_k <= group.num_experts
            assert len([n for n, lin in layer.linears.items() if isinstance(lin, ExpertLinear)]) == len(
                group.names(0)) * len(keep)
    assert config_expert_counts(model.config) == {NUM_EXPERTS // 2}
    reloaded = getattr(tf, moe_families()[model_type]).from_pretrained(tmp_path / "out")  # stock loading
    assert config_expert_counts(reloaded.config) == {NUM_EXPERTS // 2}
    ids = torch.randint(0, 120, (1, 12))
    with torch.no_grad():
        logits = reloaded(input_ids=ids).logits
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("model_type", CORE)
def test_expert_frequency_on_every_core_family(model_type: str, calib_file: Path, tmp_path: Path) -> None:
    model = tiny_moe(model_type)
    result = _prune(model, calib_file, method="expert-frequency", sparsity=0.25, output=str(tmp_path / "o"))
    assert result.report["moe"]["experts_per_layer"] == [3]
    reloaded = getattr(tf, moe_families()[model_type]).from_pretrained(tmp_path / "o")
    with torch.no_grad():
        assert torch.isfinite(reloaded(input_ids=torch.randint(0, 120, (1, 8))).logits).all()


@pytest.mark.parametrize(("kw", "match"), [
    ({"method": "reap", "sparsity": 0.9}, "remove every one"),
    ({"method": "reap", "sparsity": 0.75}, "fewer than the 2"),
    ({"method": "expert-frequency", "sparsity": 0.1}, "removes none"),
    ({"method": "reap", "pattern": "2:4"}, "not an N:M"),
    ({"method": "wanda", "sparsity": 0.5, "recipe": {"moe": {"targets": "shared"}}}, "no shared experts"),
    ({"method": "reap", "sparsity": 0.5, "recipe": {"moe": {"targets": "experts"}}}, "leave moe.targets=all"),
    ({"method": "wanda", "sparsity": 0.5, "recipe": {"calib": {"moe": "some"}}}, "calib.moe"),
])
def test_bad_input_is_refused_before_any_work(kw: dict, match: str, calib_file: Path) -> None:
    model = tiny_moe("mixtral")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(LLMPruneError, match=match):
        _prune(model, calib_file, **kw)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_expert_pruning_and_expert_targets_on_a_dense_model_are_refused(calib_file: Path) -> None:
    with pytest.raises(LLMPruneError, match="no Mixture-of-Experts layer"):
        _prune(tiny_model("llama", vocab_size=128), calib_file, method="reap", sparsity=0.5)
    with pytest.raises(LLMPruneError, match="no MoE layer"):
        _prune(tiny_model("llama", vocab_size=128), calib_file, method="wanda", sparsity=0.5,
               recipe={"moe": {"targets": "experts"}})


def test_targets_shared_prunes_the_shared_experts_alone(calib_file: Path) -> None:
    model = tiny_moe("qwen2_moe")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    _prune(model, calib_file, method="wanda", sparsity=0.5, recipe={"moe": {"targets": "shared"}})
    for name, p in model.state_dict().items():
        if ".mlp.shared_expert." in name and p.dim() == 2:
            assert (p == 0).float().mean() == 0.5, name
        else:
            assert torch.equal(p, before[name]), name
    model = tiny_moe("qwen2_moe")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    _prune(model, calib_file, method="sparsegpt", pattern="2:4", recipe={"moe": {"targets": "experts"}})
    for name, p in model.state_dict().items():
        changed = not torch.equal(p, before[name])
        assert changed == (".mlp.experts." in name), name


def test_allocate_removals_takes_the_lowest_normalized_scores_and_keeps_top_k() -> None:
    from llmprune.methods.experts import allocate_removals

    # layer 0's scores are 10x layer 1's: divided by their means they compare as [0.4, 0.8, 1.2, 1.6] x 2
    low, high = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([40.0, 10.0, 30.0, 20.0])
    assert allocate_removals([low, high], [2, 2], 2) == [[0], [1]]
    assert allocate_removals([low, high], [2, 2], 3) == [[0, 1], [1]]  # tie 0.8: the earlier layer first
    assert allocate_removals([low, high], [3, 1], 3) == [[0], [1, 3]]  # layer 0 keeps its top-3
    with pytest.raises(LLMPruneError, match="top-k"):
        allocate_removals([low, high], [3, 3], 3)


def test_per_layer_expert_counts_reload_through_llmprune_load_not_stock(calib_file: Path, tmp_path: Path) -> None:
    from llmprune.methods.experts import allocate_removals
    from llmprune.models.byte_tokenizer import byte_level_tokenizer

    model = tiny_moe("qwen3_moe", layers=3, vocab_size=257)
    result = llmprune.prune(model, tokenizer=byte_level_tokenizer(), method="reap", sparsity=0.375, nsamples=2,
                            seqlen=32, calib_dataset=str(calib_file), output=str(tmp_path / "out"),
                            method_options={"per_layer": True})
    reps = [r["experts"]["mlp.experts"] for r in result.report["layers"]]
    # round(0.375 x 12) = 5 experts in total; the lowest scores over each layer's mean, every layer keeps top-2
    expected = allocate_removals([torch.tensor(r["saliency"]) for r in reps], [2, 2, 2], 5)
    assert [r["removed"] for r in reps] == expected and sum(map(len, expected)) == 5
    kept = [NUM_EXPERTS - len(r) for r in expected]
    assert len(set(kept)) > 1 and min(kept) >= 2 and [r["kept"] for r in reps] == kept
    assert result.report["moe"]["experts_removed"] == 5
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["llmprune_structure"] == {"experts_per_layer": kept} and config["num_local_experts"] == max(kept)
    loading = result.report["loading"]
    assert loading["stock_from_pretrained"] is False and "expert counts differ" in loading["why"][0]
    assert "llmprune.load" in loading["load_with"]
    with pytest.raises(RuntimeError, match="mismatch"):  # stock transformers refuses the per-layer shapes
        tf.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "out")
    reloaded, _ = llmprune.load(str(tmp_path / "out"))
    assert [layer.experts[0].num_experts for layer in model_view(reloaded).layers] == kept
    for (name, p), (name2, q) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert name == name2 and torch.equal(p, q), name
    ids = torch.randint(0, 257, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_per_layer_bad_input_is_refused_before_work(calib_file: Path) -> None:
    model = tiny_moe("mixtral")  # 2 layers x 4 experts, top-2: at most 4 can go
    with pytest.raises(LLMPruneError, match="at most 4 can go"):
        _prune(model, calib_file, method="reap", sparsity=0.7, method_options={"per_layer": True})
    with pytest.raises(LLMPruneError, match="removes none"):
        _prune(model, calib_file, method="expert-frequency", sparsity=0.05, method_options={"per_layer": True})
