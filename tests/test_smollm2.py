"""End to end on the real SmolLM2-135M with a small calibration set (the issue's quality checks)."""

from __future__ import annotations

from pathlib import Path

import pytest

import llmprune
from llmprune.models.loading import load_model

pytestmark = pytest.mark.slow

SETTINGS = dict(calib_dataset="c4", nsamples=8, seqlen=256, eval="wikitext2", eval_seqlen=512, eval_windows=4,
                eval_dense=False)


@pytest.fixture(scope="module")
def results(smollm2, data_dir: Path) -> dict[str, llmprune.PruneResult]:
    out = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model, tok = load_model("smollm2-135m", "float32", "cpu")  # fresh: pruning works in place
        out[method] = llmprune.prune(model, tokenizer=tok, method=method, sparsity=0.5, data_dir=str(data_dir), **SETTINGS)
    return out


def test_wanda_and_sparsegpt_far_better_than_magnitude(results: dict[str, llmprune.PruneResult]) -> None:
    ppl = {m: r.report["eval"]["wikitext2"]["ppl"] for m, r in results.items()}
    assert ppl["wanda"] < 0.5 * ppl["magnitude"], ppl
    assert ppl["sparsegpt"] < 0.5 * ppl["magnitude"], ppl


def test_exactly_half_of_the_decoder_linear_weights_are_zero(results: dict[str, llmprune.PruneResult]) -> None:
    for method, res in results.items():
        sp = res.report["sparsity"]
        # The GGUF's dequantized weights already hold a few zeros; the selectors prune those first (score 0),
        # so the count is exact, except that SparseGPT's reconstruction may leave a rare kept weight at 0.0.
        if method == "sparsegpt":
            assert 0 <= sp["zeros"] - sp["weights"] // 2 <= 1e-6 * sp["weights"], (method, sp["zeros"])
        else:
            assert sp["zeros"] == sp["weights"] // 2, (method, sp["zeros"], sp["weights"])
        # 30 layers x (q, o: 576x576; k, v: 192x576; gate, up: 1536x576; down: 576x1536)
        assert sp["weights"] == res.report["params"]["pruned_linears"] == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)


def test_two_four_on_the_real_model(smollm2, data_dir: Path) -> None:
    model, tok = load_model("smollm2-135m", "float32", "cpu")
    res = llmprune.prune(model, tokenizer=tok, method="wanda", pattern="2:4", data_dir=str(data_dir),
                         **{**SETTINGS, "eval": None})
    assert res.report["sparsity"]["nm_valid"] is True
    # Exactly 2 of every 4 pruned, plus the few weights the GGUF dequantizes to 0.0 among the kept ones.
    assert 0.5 <= res.report["sparsity"]["overall"] < 0.5 + 1e-5


# LLM-Barber needs more calibration than the pruners: with 8 x 256 tokens its swaps fit the calibration
# set (lower sub-block error, higher perplexity); with 32 x 256 they generalise. Measured settings: the
# reference rule at ratio 0.1 (unstructured) and the paired N:M rule at ratio 0.1 (2:4; the reference
# N:M rule raises perplexity on this model, see the benchmark).
BARBER_CASES = {
    "unstructured50": ({"sparsity": 0.5}, {"init": "wanda", "ratio": 0.1, "granularity": "output"}),
    "2of4": ({"pattern": "2:4"}, {"init": "wanda", "ratio": 0.1, "granularity": "output", "nm_rule": "paired"}),
}


@pytest.mark.parametrize("case", list(BARBER_CASES))
def test_barber_on_wanda_beats_wanda(smollm2, data_dir: Path, case: str) -> None:
    sparsity, options = BARBER_CASES[case]
    settings = {**SETTINGS, "nsamples": 32, "data_dir": str(data_dir), **sparsity}
    model, tok = load_model("smollm2-135m", "float32", "cpu")
    wanda = llmprune.prune(model, tokenizer=tok, method="wanda", **settings)
    model, tok = load_model("smollm2-135m", "float32", "cpu")
    barber = llmprune.prune(model, tokenizer=tok, method="barber", method_options=options, **settings)
    ppl_wanda, ppl_barber = (r.report["eval"]["wikitext2"]["ppl"] for r in (wanda, barber))
    assert ppl_barber < ppl_wanda, (case, ppl_barber, ppl_wanda)
    assert barber.report["sparsity"]["zeros"] == wanda.report["sparsity"]["zeros"]  # identical sparsity,
    assert barber.report["sparsity"]["layers"] == wanda.report["sparsity"]["layers"]  # per layer and linear
    swaps = sum(sum(layer["swaps"].values()) for layer in barber.report["layers"])
    assert swaps > 0
    errors = [e for layer in barber.report["layers"] for e in layer["reconstruction"].values()]
    improved = sum(e["mse_after"] < e["mse_before"] for e in errors)
    assert improved > 0.5 * len(errors), (improved, len(errors))  # most sub-blocks (not all: see `guard`)
    if "pattern" in sparsity:
        assert barber.report["sparsity"]["nm_valid"] is True


@pytest.fixture(scope="module")
def structured20(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, llmprune.PruneResult]:
    """20% of the MLP channels removed by CFSP (defaults) and the two uniform baselines; CFSP saved."""
    out = {}
    for method in ("cfsp", "magnitude-sp", "wanda-sp"):
        model, tok = load_model("smollm2-135m", "float32", "cpu")
        save = {"output": str(tmp_path_factory.mktemp("cfsp") / "out")} if method == "cfsp" else {}
        out[method] = llmprune.prune(model, tokenizer=tok, method=method, sparsity=0.2, data_dir=str(data_dir),
                                     **{**SETTINGS, "nsamples": 32}, **save)
    return out


def test_cfsp_beats_structured_baselines(structured20: dict[str, llmprune.PruneResult]) -> None:
    ppl = {m: r.report["eval"]["wikitext2"]["ppl"] for m, r in structured20.items()}
    assert ppl["cfsp"] < ppl["wanda-sp"] < ppl["magnitude-sp"], ppl
    for res in structured20.values():
        st = res.report["structure"]
        assert st["mlp_channels"]["removed_fraction"] == pytest.approx(0.2, abs=1e-3)
        assert st["params"]["pruned"] < st["params"]["dense"] == 134_515_008


def test_cfsp_smollm2_checkpoint_reloads(structured20: dict[str, llmprune.PruneResult]) -> None:
    import torch

    res = structured20["cfsp"]
    assert res.output is not None and len(set(res.report["structure"]["mlp_channels"]["widths"])) > 1
    reloaded, _ = llmprune.load(res.output)
    ids = torch.arange(100, 164).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, res.model(input_ids=ids).logits, rtol=0, atol=0)
