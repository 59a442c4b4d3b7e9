"""End to end on the real SmolLM2-135M with a small calibration set: CFSP against the uniform
structured baselines, and its checkpoint reloading."""

from __future__ import annotations

from pathlib import Path

import pytest

import llmprune

from .smollm2_common import prune_fresh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def structured20(smollm2, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, llmprune.PruneResult]:
    """20% of the MLP channels removed by CFSP (defaults) and the two uniform baselines; CFSP saved."""
    out = {}
    for method in ("cfsp", "magnitude-sp", "wanda-sp"):
        save = {"output": str(tmp_path_factory.mktemp("cfsp") / "out")} if method == "cfsp" else {}
        out[method] = prune_fresh(data_dir, method, sparsity=0.2, nsamples=32, **save)
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
