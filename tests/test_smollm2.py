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
def results(smollm2, data_dir: Path, wanda_baselines: dict[str, llmprune.PruneResult]) -> dict[str, llmprune.PruneResult]:
    """Magnitude and SparseGPT at 50%, and Wanda at 50% from the Barber baselines (32 x 256 tokens, one
    run fewer in the suite)."""
    out = {}
    for method in ("magnitude", "sparsegpt"):
        model, tok = load_model("smollm2-135m", "float32", "cpu")  # fresh: pruning works in place
        out[method] = llmprune.prune(model, tokenizer=tok, method=method, sparsity=0.5, data_dir=str(data_dir), **SETTINGS)
    out["wanda"] = wanda_baselines["unstructured50"]
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


# LLM-Barber on Wanda, with a small calibration set (32 x 256 tokens at 50%, 16 x 256 at 2:4). The
# paper's rule keeps the dense values of the kept weights; on this model it moves perplexity by well
# under 1% either way at this size (measured at 50%: 67.867 against Wanda's 67.846 on these 4
# windows, 68.571 against 68.737 on 8 x 1024; a tie that another CPU's rounding flips), so the
# end-to-end claim is checked with the ``reconstruct`` extension, which re-solves the kept weights
# for the rebuilt mask (README: LLM-Barber; measured 64.19 at 50%, and 141.9 against Wanda's 199.9 at
# 2:4). With 16 x 256 tokens the re-solve overfits at 50% and the gain is gone, hence 32 there.
# Each case's Wanda baseline runs on the same tokens.
BARBER_CASES = {
    "unstructured50": ({"sparsity": 0.5, "nsamples": 32},
                       {"init": "wanda", "ratio": 0.1, "granularity": "output", "reconstruct": True}),
    "2of4": ({"pattern": "2:4", "nsamples": 16},
             {"init": "wanda", "ratio": 0.01, "granularity": "output", "nm_rule": "paired", "reconstruct": True}),
}


@pytest.fixture(scope="module")
def wanda_baselines(smollm2, data_dir: Path) -> dict[str, llmprune.PruneResult]:
    out = {}
    for case, (settings, _) in BARBER_CASES.items():
        model, tok = load_model("smollm2-135m", "float32", "cpu")
        out[case] = llmprune.prune(model, tokenizer=tok, method="wanda", data_dir=str(data_dir),
                                   **{**SETTINGS, **settings})
    return out


def test_two_four_on_the_real_model(wanda_baselines: dict[str, llmprune.PruneResult]) -> None:
    res = wanda_baselines["2of4"]
    assert res.report["sparsity"]["nm_valid"] is True
    # Exactly 2 of every 4 pruned, plus the few weights the GGUF dequantizes to 0.0 among the kept ones.
    assert 0.5 <= res.report["sparsity"]["overall"] < 0.5 + 1e-5


@pytest.mark.parametrize("case", list(BARBER_CASES))
def test_barber_on_wanda_beats_wanda(wanda_baselines: dict[str, llmprune.PruneResult], data_dir: Path,
                                     case: str) -> None:
    settings, options = BARBER_CASES[case]
    wanda = wanda_baselines[case]
    model, tok = load_model("smollm2-135m", "float32", "cpu")
    barber = llmprune.prune(model, tokenizer=tok, method="barber", method_options=options, data_dir=str(data_dir),
                            **{**SETTINGS, **settings})
    assert barber.report["calibration"]["tokens_sha256"] == wanda.report["calibration"]["tokens_sha256"]
    ppl_wanda, ppl_barber = (r.report["eval"]["wikitext2"]["ppl"] for r in (wanda, barber))
    assert ppl_barber < 0.97 * ppl_wanda, (case, ppl_barber, ppl_wanda)
    # Identical sparsity, per layer and linear. Wanda's masks come from X^T X's diagonal here (reconstruct
    # collects the Hessian), so they may differ from Wanda's in a tie, never in the count of zeros, except
    # that the re-solved weights may leave a rare kept weight at exactly 0.0.
    sp_b, sp_w = barber.report["sparsity"], wanda.report["sparsity"]
    assert 0 <= sp_b["zeros"] - sp_w["zeros"] <= 1e-6 * sp_w["weights"], (case, sp_b["zeros"], sp_w["zeros"])
    for layer_b, layer_w in zip(sp_b["layers"], sp_w["layers"], strict=True):
        for name, fraction in layer_w["linears"].items():
            assert fraction <= layer_b["linears"][name] <= fraction + 1e-5, (case, layer_w["layer"], name)
    swaps = sum(sum(layer["swaps"].values()) for layer in barber.report["layers"])
    assert swaps > 0
    errors = [e for layer in barber.report["layers"] for e in layer["reconstruction"].values()]
    improved = sum(e["mse_after"] < e["mse_before"] for e in errors)
    assert improved > 0.9 * len(errors), (improved, len(errors))
    if "pattern" in settings:
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
