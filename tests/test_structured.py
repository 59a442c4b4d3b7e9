"""Structured pruning: allocation and channel scores on hand-made tensors, channel removal on every
family, checkpoints that reload, FLAP's bias compensation, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.data.sources import resolve
from llmprune.data.tokens import calibration_windows
from llmprune.errors import LLMPruneError
from llmprune.models.surgery import STRUCTURE_KEY, mlp_group, shrink_mlp
from llmprune.models.view import model_view
from llmprune.report import param_count
from llmprune.sparsity import channels
from llmprune.sparsity.allocation import REFERENCE_TOKENS, block_importance, channel_counts, keep_fractions

from .conftest import FAMILIES, byte_level_tokenizer, save_tiny, tiny_model

STRUCTURED = ["cfsp", "magnitude-sp", "wanda-sp", "flap"]


# ------------------------------------------------------------------ allocation (hand-made values)

def test_keep_fractions_by_hand() -> None:
    imp = torch.tensor([10000.0, 20000.0, 30000.0])  # deviations -1e4, 0, 1e4 -> sigmoid(-1), 1/2, sigmoid(1)
    keep = keep_fractions(imp, 0.5)
    s = torch.sigmoid(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    expected = s / s.mean() * 0.5
    torch.testing.assert_close(keep.double(), expected.float().double(), atol=1e-6, rtol=0)
    assert keep.mean().item() == pytest.approx(0.5)
    assert keep[0] < keep[1] < keep[2]  # more important blocks keep more
    # a = 0 (or equal importances) gives a uniform allocation
    torch.testing.assert_close(keep_fractions(imp, 0.3, a=1e-12), torch.full((3,), 0.7))


def test_keep_fractions_clipping_rule() -> None:
    imp = torch.tensor([0.0, 0.0, 0.0, 1e6])  # sigmoid saturates: max(s)/mean(s)*(1-ratio) >= 1
    ratio = 0.1
    s = torch.sigmoid((imp.double() - imp.double().mean()) / 1e4)
    assert s.max() / s.mean() * (1 - ratio) >= 1
    scale = s.mean() * (1 / (1 - ratio) - 1) / (s.max() - s.mean()) / 1.05
    shrunk = s.mean() + (s - s.mean()) * scale
    expected = shrunk / shrunk.mean() * (1 - ratio)
    keep = keep_fractions(imp, ratio)
    torch.testing.assert_close(keep.double(), expected.float().double(), atol=1e-6, rtol=0)
    assert keep.max() < 1.0 and keep.mean().item() == pytest.approx(1 - ratio)


def test_per_token_normalization_matches_reference_at_reference_tokens() -> None:
    imp = torch.tensor([1.0, 3.0, 2.0, 5.0]) * 1e3  # small enough that the clipping rule stays off
    ref = keep_fractions(imp, 0.3)
    torch.testing.assert_close(keep_fractions(imp, 0.3, tokens=REFERENCE_TOKENS, normalize="per_token"), ref)
    # Twice the tokens, same per-token importance: the reference form gets sharper, per_token does not.
    torch.testing.assert_close(keep_fractions(imp * 2, 0.3, tokens=2 * REFERENCE_TOKENS, normalize="per_token"), ref)
    assert keep_fractions(imp * 2, 0.3).std() > 1.5 * ref.std()


def test_channel_counts_exact_total_and_rounding() -> None:
    keep = torch.tensor([0.55, 0.61, 0.84])
    counts = channel_counts(keep, 100)
    assert sum(counts) == round(float(keep.sum()) * 100) and counts == [55, 61, 84]
    counts = channel_counts(torch.tensor([0.333, 0.333, 0.334]), 10)  # 3.33+3.33+3.34 = 10
    assert sum(counts) == 10
    assert channel_counts(torch.tensor([0.3, 0.62, 1.0]), 512, round_to=128) == [128, 256, 512]
    assert channel_counts(torch.tensor([0.01]), 512, round_to=128) == [128]  # never below one multiple
    with pytest.raises(LLMPruneError, match="larger than the MLP width"):
        channel_counts(keep, 64, round_to=128)


def test_block_importance_metrics() -> None:
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    assert block_importance(x, x, "angular") == pytest.approx(0.0, abs=1e-6)
    y = torch.tensor([[[0.0, 3.0], [0.0, -1.0]]])  # 90 degrees, then 180 degrees
    assert block_importance(x, y, "angular") == pytest.approx(0.5 + 1.0)
    assert block_importance(x, y, "cosine") == pytest.approx(1.0 + 2.0)
    assert block_importance(x, y, "mse") == pytest.approx((1 + 9) / 2 + (0 + 9) / 2)
    assert block_importance(x, y, "mae") == pytest.approx((1 + 3) / 2 + (0 + 3) / 2)
    assert block_importance(x, y, "uniform") == 2.0


# ------------------------------------------------------------------ channel scores (hand-made tensors)

def test_faithful_form_ranks_by_activation_norm_alone() -> None:
    g = torch.Generator().manual_seed(0)
    hidden, width = 16, 32
    w_out, gate, up = torch.randn(hidden, width, generator=g), torch.randn(width, hidden, generator=g), torch.randn(width, hidden, generator=g)
    x_sq = torch.rand(width, generator=g) * 10
    score = channels.cfsp_faithful(w_out, [gate, up], x_sq)
    # every normalized weight term sums to 1 over i, so the mean over i is 1/hidden per term
    torch.testing.assert_close(score, 3 / hidden * x_sq.sqrt(), rtol=1e-5, atol=1e-7)
    assert torch.equal(score.argsort(), x_sq.argsort())
    # the weights do not matter at all: scaling one channel's weights changes nothing
    gate2 = gate.clone()
    gate2[0] *= 100
    torch.testing.assert_close(channels.cfsp_faithful(w_out, [gate2, up], x_sq), score)


def test_weight_aware_form_by_hand() -> None:
    # hidden 2, width 2; ||X|| = [1, 1] so only weights decide.
    w_out = torch.tensor([[1.0, 3.0], [1.0, 1.0]])  # down: (hidden, width)
    up = torch.tensor([[2.0, 2.0], [2.0, 2.0]])  # (width, hidden): equal, contributes 1/2 each
    x_sq = torch.ones(2)
    # down normalized over channels per hidden i: row0 [1/4, 3/4], row1 [1/2, 1/2]
    # channel 0: mean_i(1/4 + 1/2, 1/2 + 1/2) = (0.75 + 1) / 2 ; channel 1: (1.25 + 1) / 2
    expected = torch.tensor([0.875, 1.125])
    torch.testing.assert_close(channels.cfsp_weight_aware(w_out, [up], x_sq), expected)
    # the faithful form cannot tell them apart
    f = channels.cfsp_faithful(w_out, [up], x_sq)
    assert f[0] == pytest.approx(f[1].item())


def test_baseline_scores_by_hand() -> None:
    w_out = torch.tensor([[3.0, -1.0, 0.0], [4.0, 1.0, 2.0]])
    x_sq = torch.tensor([1.0, 4.0, 9.0])
    torch.testing.assert_close(channels.magnitude_sp(w_out), torch.tensor([5.0, math.sqrt(2), 2.0]))
    torch.testing.assert_close(channels.wanda_sp(w_out, x_sq), torch.tensor([3.5, 2.0, 3.0]))
    torch.testing.assert_close(channels.flap(w_out, torch.tensor([2.0, 0.5, 0.0])), torch.tensor([50.0, 1.0, 0.0]))
    z = channels.standardize(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(z, torch.tensor([-1.0, 0.0, 1.0]))


# ------------------------------------------------------------------ removal on every family

def _calib(tokenizer, calib_file: Path, n: int = 4, seqlen: int = 32) -> torch.Tensor:
    return calibration_windows(tokenizer, resolve(str(calib_file), "calibration", None), n, seqlen, 0)


def _prune_tiny(family: str, method: str, calib_file: Path, sparsity: float = 0.25, **opts: object):
    model = tiny_model(family, vocab_size=257)
    return llmprune.prune(model, tokenizer=byte_level_tokenizer(), method=method, sparsity=sparsity,
                          calib_dataset=str(calib_file), nsamples=4, seqlen=32, method_options=opts or None)


@pytest.mark.parametrize("method", STRUCTURED)
def test_shapes_and_params_after_removal(family: str, method: str, calib_file: Path) -> None:
    dense = tiny_model(family, vocab_size=257)
    dense_params = param_count(dense)
    per_channel = mlp_group(model_view(dense).layers[0]).channel_params()
    result = _prune_tiny(family, method, calib_file)
    view = model_view(result.model)
    st = result.report["structure"]
    widths = [mlp_group(layer).width for layer in view.layers]
    assert widths == st["mlp_channels"]["widths"]
    removed = 128 * len(widths) - sum(widths)
    assert st["mlp_channels"]["removed_fraction"] == pytest.approx(0.25, abs=1 / 128)
    added_bias = sum(mlp_group(layer).output.out_features for layer in view.layers) if (
        method == "flap" and family != "opt") else 0  # FLAP creates a bias where there was none
    assert param_count(result.model) == dense_params - removed * per_channel + added_bias
    assert st["params"]["pruned"] == param_count(result.model) and st["params"]["dense"] == dense_params
    for layer, width in zip(view.layers, widths, strict=True):
        group = mlp_group(layer)
        for name, lin in group.inputs.items():
            assert lin.out_features == group.fused[name] * width
    if method in ("magnitude-sp", "wanda-sp"):
        assert len(set(widths)) == 1
    ids = torch.randint(0, 257, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(result.model(input_ids=ids).logits).all()


def _kill_channels(model: torch.nn.Module, dead: int) -> None:
    """Make the first ``dead`` channels of every layer carry no activation (gate/up/fc1 rows zeroed).

    Where the input linear has a bias (OPT's fc1 before a ReLU), the other channels get a large
    bias so that none of them is dead by chance on the calibration text (a tie at score 0)."""
    for layer in model_view(model).layers:
        group = mlp_group(layer)
        with torch.no_grad():
            for name, lin in group.inputs.items():
                rows = group.input_rows(name)  # (width, parts, hidden) view
                rows[:dead] = 0.0
                if lin.bias is not None:
                    lin.bias.view(group.fused[name], group.width)[:, :dead] = 0.0
                    lin.bias.view(group.fused[name], group.width)[:, dead:] = 10.0


@pytest.mark.parametrize("method", ["cfsp", "wanda-sp", "flap"])
def test_removing_dead_channels_leaves_logits_unchanged(family: str, method: str, calib_file: Path) -> None:
    model = tiny_model(family, vocab_size=257)
    _kill_channels(model, 32)
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    opts = {"importance": "uniform"} if method == "cfsp" else {"uniform": True}
    result = llmprune.prune(model, tokenizer=byte_level_tokenizer(), method=method, sparsity=0.25,
                            calib_dataset=str(calib_file), nsamples=4, seqlen=32, method_options=opts)
    assert result.report["structure"]["mlp_channels"]["widths"] == [96, 96, 96]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=2e-5)


def test_flap_bias_compensation_keeps_the_mean_output(calib_file: Path) -> None:
    model = tiny_model("llama", vocab_size=257)
    tok = byte_level_tokenizer()
    calib = _calib(tok, calib_file)
    mlp = model.model.layers[0].mlp
    seen: list[torch.Tensor] = []
    handle = mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        for row in calib:
            model(input_ids=row[None])
    handle.remove()
    inputs = torch.cat(seen).reshape(-1, 64)
    with torch.no_grad():
        dense_mean = mlp(inputs).mean(0)
    llmprune.prune(model, tokenizer=tok, method="flap", sparsity=0.4, calib_dataset=str(calib_file), nsamples=4,
                   seqlen=32)
    pruned = model.model.layers[0].mlp
    assert pruned.down_proj.in_features < 128 and pruned.down_proj.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(pruned(inputs).mean(0), dense_mean, rtol=0, atol=1e-5)
    # without the compensation the mean would move
    with torch.no_grad():
        assert (pruned(inputs).mean(0) - pruned.down_proj.bias - dense_mean).abs().max() > 1e-3


def test_shrink_mlp_refuses_to_empty_a_block() -> None:
    layer = model_view(tiny_model("llama")).layers[0]
    with pytest.raises(LLMPruneError, match="empty block"):
        shrink_mlp(layer, torch.tensor([], dtype=torch.long))


def test_target_params_reports_both(calib_file: Path) -> None:
    result = _prune_tiny("llama", "wanda-sp", calib_file, sparsity=0.1, target="params")
    st = result.report["structure"]
    assert st["target"] == "params"
    assert st["params"]["removed_fraction"] == pytest.approx(0.1, abs=0.01)
    assert 0 < st["mlp_channels"]["removed_fraction"] < 1
    assert result.report["recipe"]["method"]["target"] == "params"
    assert result.report["recipe"]["method"]["pattern"] == "channels"


def test_rounding_multiple(calib_file: Path) -> None:
    result = _prune_tiny("llama", "cfsp", calib_file, sparsity=0.5, round_to=32)
    assert all(w % 32 == 0 for w in result.report["structure"]["mlp_channels"]["widths"])


# ------------------------------------------------------------------ checkpoints that reload

@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "opt"])
@pytest.mark.parametrize("method", ["cfsp", "flap"])
def test_save_reload_identical_logits(family: str, method: str, tiny_model_dir, calib_file: Path,
                                      tmp_path: Path) -> None:
    folder = tiny_model_dir(family)
    out = tmp_path / "out"
    result = llmprune.prune(str(folder), method=method, sparsity=0.3, calib_dataset=str(calib_file), nsamples=4,
                            seqlen=32, output=str(out))
    config = json.loads((out / "config.json").read_text())
    assert config[STRUCTURE_KEY]["mlp_widths"] == result.report["structure"]["mlp_channels"]["widths"]
    rep = json.loads((out / "llmprune.json").read_text())
    assert rep["structure"]["checkpoint"]["stock_checkpoint"] is False
    reloaded, _ = llmprune.load(out)
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits, rtol=0, atol=0)
    # Stock transformers cannot build per-layer widths: it must fail loudly, not load wrong weights.
    if len(set(config[STRUCTURE_KEY]["mlp_widths"])) > 1:
        with pytest.raises(Exception, match="(?i)size|shape"):
            AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "opt"])
def test_uniform_widths_are_a_stock_checkpoint(family: str, tiny_model_dir, calib_file: Path, tmp_path: Path) -> None:
    folder = tiny_model_dir(family)
    out = tmp_path / "out"
    result = llmprune.prune(str(folder), method="cfsp", sparsity=0.3, calib_dataset=str(calib_file), nsamples=4,
                            seqlen=32, output=str(out), method_options={"uniform": True})
    assert result.report["structure"]["checkpoint"]["stock_checkpoint"] is True
    assert STRUCTURE_KEY not in json.loads((out / "config.json").read_text())
    # No importance-driven allocation is reported when widths are forced uniform.
    assert result.report["structure"]["keep_fractions"] == [] and result.report["structure"]["uniform_widths"]
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits, rtol=0, atol=0)


def test_checkpoint_with_wrong_recorded_widths_is_refused(tiny_model_dir, calib_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    llmprune.prune(str(tiny_model_dir("llama")), method="flap", sparsity=0.3, calib_dataset=str(calib_file),
                   nsamples=4, seqlen=32, output=str(out))
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config[STRUCTURE_KEY]["mlp_widths"][1] += 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(LLMPruneError, match="do not match its tensors"):
        llmprune.load(out)
    config[STRUCTURE_KEY]["mlp_widths"] = [0, 1]
    config_path.write_text(json.dumps(config))
    with pytest.raises(LLMPruneError, match="malformed"):
        llmprune.load(out)


# ------------------------------------------------------------------ bad input, before any work

@pytest.mark.parametrize(("sparsity", "opts", "pattern", "message"), [
    (0.999, {}, None, "every block needs at least one"),
    (0.3, {"round_to": 256}, None, "larger than the MLP width 128"),
    (None, {}, "2:4", "N:M patterns do not apply"),
    (0.9, {"target": "params"}, None, "more than all MLP channels hold"),
    (0.3, {"importance": "euclid"}, None, "invalid options for method cfsp"),
])
def test_bad_structured_input(sparsity, opts, pattern, message, tiny_model_dir, calib_file: Path, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    import llmprune.api

    def no_calibration(*_a: object, **_k: object) -> None:
        raise AssertionError("calibration started before the input was checked")

    monkeypatch.setattr(llmprune.api, "calibration_windows", no_calibration)
    with pytest.raises(LLMPruneError, match=message):
        llmprune.prune(str(tiny_model_dir("llama")), method="cfsp", sparsity=sparsity, pattern=pattern,
                       calib_dataset=str(calib_file), nsamples=4, seqlen=32, method_options=opts,
                       output=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_structured_methods_listed() -> None:
    from llmprune.methods import METHODS

    for name in STRUCTURED:
        assert name in METHODS
    assert set(FAMILIES) >= {"llama", "opt", "phi3"}


def test_one_calibration_pass_serves_every_method_and_ratio(calib_file: Path) -> None:
    """What benchmarks/structured.py relies on: finalize from another method's recorded statistics
    gives exactly the model a separate run gives."""
    from llmprune.engine.engine import run_layerwise
    from llmprune.methods import METHODS
    from llmprune.sparsity.patterns import parse_pattern

    tok = byte_level_tokenizer()
    collector_model = tiny_model("qwen2", vocab_size=257)
    collector = METHODS.get("cfsp")(parse_pattern(None, 0.0), METHODS.get("cfsp").Options())
    run_layerwise(model_view(collector_model), collector, _calib(tok, calib_file), device=torch.device("cpu"))
    for method, opts in [("flap", {}), ("cfsp", {"score": "faithful"}), ("wanda-sp", {})]:
        separate = llmprune.prune(tiny_model("qwen2", vocab_size=257), tokenizer=tok, method=method, sparsity=0.4,
                                  calib_dataset=str(calib_file), nsamples=4, seqlen=32, method_options=opts)
        cls = METHODS.get(method)
        inst = cls(parse_pattern(None, 0.4), cls.Options(**opts))
        model = tiny_model("qwen2", vocab_size=257)
        view = model_view(model)
        inst.validate(view)
        inst.layer_stats = collector.layer_stats
        inst.finalize(view)
        for (name, a), (_, b) in zip(model.state_dict().items(), separate.model.state_dict().items(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------ optional attention pruning (KV groups)

ATTN_SAFE = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]


@pytest.mark.parametrize("family", ATTN_SAFE)
def test_attention_dead_kv_group_removed_without_changing_logits(family: str, calib_file: Path) -> None:
    model = tiny_model(family, vocab_size=257, num_key_value_heads=4)
    from llmprune.models.surgery import attn_group

    for layer in model_view(model).layers:  # KV group 2 of every layer outputs nothing (its values are 0)
        group = attn_group(layer)
        v = group.linear("v")
        with torch.no_grad():
            v.weight[group.kv_rows(torch.tensor([2]))] = 0.0
            if v.bias is not None:
                v.bias[group.kv_rows(torch.tensor([2]))] = 0.0
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    result = llmprune.prune(model, tokenizer=byte_level_tokenizer(), method="cfsp", sparsity=0.0,
                            calib_dataset=str(calib_file), nsamples=4, seqlen=32,
                            method_options={"importance": "uniform", "attention": 0.25})
    att = result.report["structure"]["attention"]
    assert att["kv_heads"] == [3, 3, 3] and att["kv_heads_dense"] == [4, 4, 4]
    for layer in model_view(model).layers:
        group = attn_group(layer)
        assert group.linear("q").out_features == 3 * group.q_per_kv * group.head_dim
        assert group.linear("o").in_features == group.linear("q").out_features
        assert group.linear("k").out_features == group.linear("v").out_features == 3 * group.head_dim
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=2e-5)
        model.generate(input_ids=ids[:, :5], attention_mask=torch.ones_like(ids[:, :5]), max_new_tokens=4,
                       do_sample=False)  # the KV cache works with fewer heads


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_attention_pruned_checkpoint_reloads(family: str, calib_file: Path, tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "dense", family, num_key_value_heads=4)
    for uniform in (False, True):
        out = tmp_path / f"out-{uniform}"
        result = llmprune.prune(str(folder), method="cfsp", sparsity=0.25, calib_dataset=str(calib_file), nsamples=4,
                                seqlen=32, output=str(out), method_options={"attention": 0.5, "uniform": uniform,
                                                                             "importance": "mse"})
        ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
        reloaded = (AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32) if uniform
                    else llmprune.load(out)[0]).eval()
        if uniform:
            assert result.report["structure"]["checkpoint"]["stock_checkpoint"] is True
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["phi3", "opt"])
def test_attention_pruning_refused_where_heads_are_not_removable(family: str, calib_file: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import llmprune.api

    monkeypatch.setattr(llmprune.api, "calibration_windows", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    with pytest.raises(LLMPruneError, match="cannot be removed safely"):
        llmprune.prune(tiny_model(family, vocab_size=257), tokenizer=byte_level_tokenizer(), method="cfsp",
                       sparsity=0.2, calib_dataset=str(calib_file), nsamples=4, seqlen=32,
                       method_options={"attention": 0.5})


def test_cli_structured_prune_and_eval(tiny_model_dir, calib_file: Path, data_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llmprune.cli import app

    runner = CliRunner()
    out = tmp_path / "cli-cfsp"
    args = ["prune", "--model", str(tiny_model_dir("qwen2")), "--method", "cfsp", "--sparsity", "0.25",
            "--output", str(out), "--calib-dataset", str(calib_file), "--nsamples", "4", "--seqlen", "32",
            "--data-dir", str(data_dir), "--eval", "wikitext2", "--eval-seqlen", "64", "--eval-windows", "1",
            "--set", "method.round_to=16", "--set", "method.attention=0.5"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "MLP channels removed" in res.output and "parameters removed" in res.output
    rep = json.loads((out / "llmprune.json").read_text())
    assert rep["recipe"]["method"]["round_to"] == 16 and rep["recipe"]["method"]["attention"] == 0.5
    assert all(w % 16 == 0 for w in rep["structure"]["mlp_channels"]["widths"])
    assert rep["params"]["total"] == rep["structure"]["params"]["pruned"] < rep["params"]["dense"]
    js = tmp_path / "eval.json"
    ev = runner.invoke(app, ["eval", "--model", str(out), "--eval", "wikitext2", "--eval-seqlen", "64",
                             "--eval-windows", "1", "--data-dir", str(data_dir), "--json", str(js)])
    assert ev.exit_code == 0, ev.output
    assert json.loads(js.read_text())["eval"]["wikitext2"]["ppl"] == pytest.approx(rep["eval"]["wikitext2"]["ppl"], rel=1e-6)
    bad = runner.invoke(app, [*args[:-4], "--set", "method.round_to=1000", "--overwrite"])
    assert bad.exit_code == 2 and "larger than the MLP width" in bad.output


@pytest.mark.parametrize(("score", "baseline"), [("wanda_sp", "wanda-sp"), ("magnitude", "magnitude-sp")])
def test_cfsp_baseline_score_forms_under_uniform_allocation_equal_the_baselines(score: str, baseline: str,
                                                                                calib_file: Path) -> None:
    a = _prune_tiny("llama", "cfsp", calib_file, score=score, importance="uniform")
    b = _prune_tiny("llama", baseline, calib_file)
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
