"""What the real-model test modules share: the small-calibration settings, a fresh SmolLM2 per run,
and LLM-Barber's end-to-end claim against the Wanda run on the same tokens.

The SmolLM2 checks are split into modules by the runs they share (tests/test_smollm2*.py) so that
``make test``'s workers (pytest-xdist, one module per worker at a time) run them side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import llmprune
from llmprune.models.loading import load_model

SETTINGS = dict(calib_dataset="c4", nsamples=8, seqlen=256, eval="wikitext2", eval_seqlen=512, eval_windows=4,
                eval_dense=False)

# LLM-Barber on Wanda, with a small calibration set (32 x 256 tokens at 50%, 16 x 256 at 2:4). The
# paper's rule keeps the dense values of the kept weights; on this model it moves perplexity by well
# under 1% either way at this size (measured at 50%: 67.867 against Wanda's 67.846 on these 4
# windows, 68.571 against 68.737 on 8 x 1024; a tie that another CPU's rounding flips), so the
# end-to-end claim is checked with the ``reconstruct`` extension, which re-solves the kept weights
# for the rebuilt mask (README: LLM-Barber; measured 64.19 at 50%, and 141.9 against Wanda's 199.9 at
# 2:4). With 16 x 256 tokens the re-solve overfits at 50% and the gain is gone, hence 32 there.
# Each case's Wanda baseline runs on the same tokens.
BARBER_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "unstructured50": ({"sparsity": 0.5, "nsamples": 32},
                       {"init": "wanda", "ratio": 0.1, "granularity": "output", "reconstruct": True}),
    "2of4": ({"pattern": "2:4", "nsamples": 16},
             {"init": "wanda", "ratio": 0.01, "granularity": "output", "nm_rule": "paired", "reconstruct": True}),
}


def prune_fresh(data_dir: Path, method: str, **settings: Any) -> llmprune.PruneResult:
    """``method`` on a freshly loaded SmolLM2 (pruning works in place), with :data:`SETTINGS` under
    ``settings``."""
    model, tok = load_model("smollm2-135m", "float32", "cpu")
    return llmprune.prune(model, tokenizer=tok, method=method, data_dir=str(data_dir), **{**SETTINGS, **settings})


def wanda_baseline(data_dir: Path, case: str) -> llmprune.PruneResult:
    """Wanda on the tokens of Barber case ``case``."""
    return prune_fresh(data_dir, "wanda", **BARBER_CASES[case][0])


def check_barber_beats_wanda(data_dir: Path, case: str, wanda: llmprune.PruneResult) -> None:
    """Barber over Wanda (case ``case``) beats ``wanda`` by 3% at the same sparsity, per linear."""
    settings, options = BARBER_CASES[case]
    barber = prune_fresh(data_dir, "barber", method_options=options, **settings)
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
