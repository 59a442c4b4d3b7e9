"""End to end on the real SmolLM2-135M with a small calibration set, at 2:4: Wanda, and LLM-Barber
over it (50% unstructured in test_smollm2.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import llmprune

from .smollm2_common import check_barber_beats_wanda, wanda_baseline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wanda24(smollm2, data_dir: Path) -> llmprune.PruneResult:
    return wanda_baseline(data_dir, "2of4")


def test_two_four_on_the_real_model(wanda24: llmprune.PruneResult) -> None:
    assert wanda24.report["sparsity"]["nm_valid"] is True
    # Exactly 2 of every 4 pruned, plus the few weights the GGUF dequantizes to 0.0 among the kept ones.
    assert 0.5 <= wanda24.report["sparsity"]["overall"] < 0.5 + 1e-5


def test_barber_on_wanda_beats_wanda(wanda24: llmprune.PruneResult, data_dir: Path) -> None:
    check_barber_beats_wanda(data_dir, "2of4", wanda24)
