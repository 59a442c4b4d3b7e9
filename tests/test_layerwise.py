"""Layer-wise sparsity allocation (``method.allocation=owl``): the published formula, OWL's outlier
ratios against an independent computation, the exact overall sparsity on every family, each layer
pruned at its own sparsity by every unstructured method, the run report, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.engine.engine import run_layerwise
from llmprune.errors import LLMPruneError
from llmprune.methods.barber import Barber, BarberOptions
from llmprune.methods.magnitude import Magnitude, MagnitudeOptions
from llmprune.methods.sparsegpt import SparseGPT, SparseGPTOptions
from llmprune.methods.wanda import Wanda, WandaOptions
from llmprune.models.view import model_view
from llmprune.sparsity.layerwise import owl_sparsities
from llmprune.sparsity.patterns import Pattern

from .conftest import ByteTokenizer, tiny_model
from .moe_families import tiny_moe

CPU = torch.device("cpu")


def calib(n: int = 4, seqlen: int = 32, seed: int = 1, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def prune(model: torch.nn.Module, method: Any, ids: torch.Tensor) -> list[dict[str, Any]]:
    view = model_view(model)
    method.validate(view)
    return run_layerwise(view, method, ids, device=CPU)


def published_owl(ratios: list[float], sparsity: float, lam: float) -> np.ndarray:
    """OWL's lib/prune.py (prune_wanda_outlier), as released: the unweighted mean."""
    r = np.array(ratios)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    r = r - np.mean(r) + (1 - sparsity)
    return 1 - r


def weighted_mean(values: list[float], weights: list[int]) -> float:
    return float(np.dot(values, weights) / np.sum(weights))


# ---------------------------------------------------------------- the formula


def test_equal_layers_give_owls_published_sparsities_and_unequal_ones_the_exact_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    ratios = list(rng.uniform(0.2, 3.0, size=12))
    for sparsity, lam in ((0.5, 0.08), (0.7, 0.1), (0.3, 0.02)):
        got = owl_sparsities(ratios, [1000] * 12, sparsity, lam)
        np.testing.assert_allclose(got, published_owl(ratios, sparsity, lam), rtol=0, atol=1e-12)
        assert weighted_mean(got, [1000] * 12) == pytest.approx(sparsity, abs=1e-12)
        params = list(rng.integers(1000, 5000, size=12))
        weighted = owl_sparsities(ratios, params, sparsity, lam)
        assert weighted_mean(weighted, params) == pytest.approx(sparsity, abs=1e-12)
        shift = np.array(weighted) - published_owl(ratios, sparsity, lam)  # only the mean subtracted differs
        np.testing.assert_allclose(shift, shift[0], atol=1e-12)
        assert min(weighted) >= sparsity - 2 * lam - 1e-12 and max(weighted) <= sparsity + 2 * lam + 1e-12
    assert owl_sparsities([1.5, 1.5, 1.5], [10, 20, 30], 0.6, 0.08) == [0.6, 0.6, 0.6]  # OWL's 0 / 0


# ---------------------------------------------------------------- OWL's ratios, computed independently


def independent_outlier_ratios(model: torch.nn.Module, ids: torch.Tensor, m: float) -> list[float]:
    """Dense forwards with hooks on every decoder linear: sum of x_j^2 per input column, the Wanda
    metric |W| * sqrt of it, concatenated per layer, the share above m times its mean (percent)."""
    view = model_view(model)
    sums: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for layer in view.layers:
        for name, lin in layer.linears.items():
            def hook(_mod: torch.nn.Module, args: tuple[Any, ...], key: tuple[int, str] = (layer.index, name)) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + x.pow(2).sum(0)
            handles.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in ids:  # one window at a time, as the engine's batches
            model(input_ids=row.unsqueeze(0))
    for handle in handles:
        handle.remove()
    ratios = []
    for layer in view.layers:
        metric = torch.cat([(lin.weight.detach().double().abs() * sums[(layer.index, name)].sqrt()).flatten()
                            for name, lin in layer.linears.items()])
        ratios.append(100.0 * int((metric > m * metric.mean()).sum()) / metric.numel())
    return ratios


@pytest.mark.parametrize("m", [5.0, 3.0])
def test_outlier_ratios_equal_an_independent_computation_of_the_published_formula(m: float) -> None:
    ids = calib()
    model = tiny_model("llama", num_hidden_layers=4)
    expected = independent_outlier_ratios(model, ids, m)
    assert len(set(expected)) > 1 and all(r > 0 for r in expected)
    method = Wanda(Pattern(0.5), WandaOptions(allocation="owl", owl_m=m, owl_lambda=0.1))
    prune(model, method, ids)
    record = method.allocation_report()
    assert record is not None and (record["name"], record["m"], record["lambda"]) == ("owl", m, 0.1)
    got = [layer["outlier_ratio"] for layer in record["layers"]]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose([layer["sparsity"] for layer in record["layers"]],
                               published_owl(expected, 0.5, 0.1), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- exact overall sparsity, every family


def expected_zeros(layer: Any, sparsity: float, scope: str) -> int:
    """What the pattern of the layer's sparsity prunes: floor per row (row scope) or per matrix."""
    total = 0
    for lin in layer.linears.values():
        rows, cols = lin.weight.shape
        total += rows * int(cols * sparsity) if scope == "row" else int(rows * cols * sparsity)
    return total


def check_allocation_realised(model: torch.nn.Module, method: Any, scope: str, target: float) -> None:
    record = method.allocation_report()
    layers = record["layers"]
    params = [layer["params"] for layer in layers]
    sparsities = [layer["sparsity"] for layer in layers]
    assert weighted_mean(sparsities, params) == pytest.approx(target, abs=1e-12)
    assert len(set(sparsities)) == len(sparsities)
    for layer, entry in zip(model_view(model).layers, layers, strict=True):
        zeros = sum(int((lin.weight == 0).sum()) for lin in layer.linears.values())
        assert entry["params"] == sum(lin.weight.numel() for lin in layer.linears.values())
        assert zeros == expected_zeros(layer, entry["sparsity"], scope), layer.index


def test_the_allocation_averages_to_the_target_and_each_layer_is_pruned_at_its_own(family: str) -> None:
    model = tiny_model(family)
    method = Wanda(Pattern(0.6), WandaOptions(allocation="owl", owl_m=3.0))
    prune(model, method, calib())
    check_allocation_realised(model, method, "row", 0.6)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_mixture_of_experts_layers_allocate_over_their_expert_views(model_type: str) -> None:
    model = tiny_moe(model_type)
    method = Wanda(Pattern(0.5), WandaOptions(allocation="owl", owl_m=3.0, owl_lambda=0.05))
    prune(model, method, calib(vocab=120))
    check_allocation_realised(model, method, "row", 0.5)


@pytest.mark.parametrize(("make", "scope"), [
    (lambda: Magnitude(Pattern(0.5, scope="matrix"), MagnitudeOptions(allocation="owl", owl_m=3.0)), "matrix"),
    (lambda: SparseGPT(Pattern(0.5, scope="matrix"), SparseGPTOptions(allocation="owl", owl_m=3.0)), "matrix"),
    (lambda: SparseGPT(Pattern(0.5, scope="row"), SparseGPTOptions(allocation="owl", owl_m=3.0, scope="row",
                                                                   sequential="linear")), "row"),
    (lambda: Wanda(Pattern(0.5), WandaOptions(allocation="owl", owl_m=3.0, sequential="linear")), "row"),
    (lambda: Barber(Pattern(0.5), BarberOptions(allocation="owl", owl_m=3.0, ratio=0.2)), "row"),
    (lambda: Barber(Pattern(0.5), BarberOptions(allocation="owl", owl_m=3.0, order="reference", ratio=0.2)), "row"),
], ids=["magnitude", "sparsegpt", "sparsegpt-row-linear", "wanda-linear", "barber", "barber-reference"])
def test_every_unstructured_method_prunes_each_layer_at_its_allocated_sparsity(make: Any, scope: str,
                                                                             wanda_ratios: list[float]) -> None:
    model, method = tiny_model("llama"), make()
    prune(model, method, calib())
    check_allocation_realised(model, method, scope, 0.5)
    # the same outlier ratios whichever method (the dense model's statistics)
    assert [r["outlier_ratio"] for r in method.allocation_report()["layers"]] == wanda_ratios


@pytest.fixture(scope="module")
def wanda_ratios() -> list[float]:
    """OWL's outlier ratios (owl_m 3) of the tiny llama, as Wanda's allocation pass measures them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests (one_thread)
    try:
        reference = Wanda(Pattern(0.5), WandaOptions(allocation="owl", owl_m=3.0))
        prune(tiny_model("llama"), reference, calib())
    finally:
        torch.set_num_threads(threads)
    return [r["outlier_ratio"] for r in reference.allocation_report()["layers"]]


def test_magnitude_with_owl_reads_calibration_but_its_pass_stays_data_free() -> None:
    method = Magnitude(Pattern(0.5), MagnitudeOptions(allocation="owl"))
    assert method.calibration_needed and not method.needs_calibration
    assert not Magnitude(Pattern(0.5), MagnitudeOptions()).calibration_needed


# ---------------------------------------------------------------- end to end, report, bad input


def test_the_run_report_records_the_allocation_and_the_model_saves_and_reloads(
        tiny_model_dir, calib_file: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "owl"
    result = llmprune.prune(str(tiny_model_dir("llama")), method="wanda", sparsity=0.6, calib_dataset=str(calib_file),
                            nsamples=4, seqlen=32, eval=None, data_dir=str(data_dir), output=str(out),
                            method_options={"allocation": "owl", "owl_m": 3})
    report = json.loads((out / "llmprune.json").read_text())
    allocation = report["allocation"]
    assert (allocation["name"], allocation["m"], allocation["lambda"], allocation["sparsity"]) == ("owl", 3, 0.08, 0.6)
    assert [entry["layer"] for entry in allocation["layers"]] == [0, 1, 2]
    assert report["recipe"]["method"]["allocation"] == "owl"
    measured = {entry["layer"]: entry["sparsity"] for entry in report["sparsity"]["layers"]}
    for entry in allocation["layers"]:
        assert measured[entry["layer"]] == pytest.approx(entry["sparsity"], abs=0.02)  # up to the per-row floor
    assert report["sparsity"]["overall"] == pytest.approx(0.6, abs=0.02)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, p), q in zip(result.model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    uniform = llmprune.prune(str(tiny_model_dir("llama")), method="wanda", sparsity=0.6, calib_dataset=str(calib_file),
                             nsamples=4, seqlen=32, eval=None, data_dir=str(data_dir))
    assert "allocation" not in uniform.report


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method_options": {"allocation": "owl", "owl_lambda": 0.3}},
     r"owl_lambda=0.3 could push a layer's sparsity outside \[0, 1\) at sparsity 0.5.*0 <= method.owl_lambda < 0.25"),
    ({"sparsity": 0.1, "method_options": {"allocation": "owl"}}, r"at sparsity 0.1 .*owl_lambda <= 0.05"),
    ({"sparsity": 0.9, "method_options": {"allocation": "owl"}}, r"owl_lambda < 0.05"),
    ({"pattern": "2:4", "sparsity": None, "method_options": {"allocation": "owl"}}, "N:M pattern 2:4"),
    ({"method_options": {"allocation": "owls"}}, r"method.allocation: Input should be 'uniform' or 'owl'"),
    ({"method_options": {"allocation": "owl", "owl_m": 0}}, r"method.owl_m: Input should be greater than 0"),
    ({"method_options": {"allocation": "owl", "owl_m": -1}}, r"method.owl_m: Input should be greater than 0"),
    ({"method_options": {"owl_m": 7}}, r"method.owl_m=7 sets OWL's .* add method.allocation=owl"),
    ({"method_options": {"owl_lambda": 0.05}}, r"method.owl_lambda=0.05 sets .* add method.allocation=owl"),
    ({"method": "cfsp", "method_options": {"allocation": "owl"}}, r"method.allocation is an option of .*not applicable "
                                                                   r"to method cfsp"),
    ({"method": "flap", "method_options": {"owl_m": 4}}, r"not applicable to method flap"),
    ({"method": "sparsegpt", "method_options": {"allocation": "owl", "owl_lambda": 0.26}}, "owl_lambda=0.26"),
    ({"method": "magnitude", "method_options": {"allocation": "owl", "owl_lambda": 0.26}}, "owl_lambda=0.26"),
    ({"method": "barber", "method_options": {"allocation": "owl", "owl_lambda": 0.26}}, "owl_lambda=0.26"),
    ({"method": "barber", "pattern": "2:4", "sparsity": None, "method_options": {"allocation": "owl"}}, "N:M"),
])
def test_bad_input_fails_before_any_work(kwargs: dict[str, Any], message: str, calib_file: Path) -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args: dict[str, Any] = {"method": "wanda", "sparsity": 0.5, "calib_dataset": str(calib_file), "nsamples": 2,
                            "seqlen": 16, **kwargs}
    with pytest.raises(LLMPruneError, match=message):
        llmprune.prune(model, tokenizer=ByteTokenizer(), **args)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_streamed_run_refuses_owl_before_any_work(tiny_model_dir, calib_file: Path, tmp_path: Path) -> None:
    with pytest.raises(LLMPruneError, match=r"allocation=owl measures every layer .* prune in memory"):
        llmprune.prune(str(tiny_model_dir("llama")), method="wanda", sparsity=0.5, calib_dataset=str(calib_file),
                       nsamples=2, seqlen=16, eval=None, stream=True, output=str(tmp_path / "out"),
                       method_options={"allocation": "owl"})
    assert not (tmp_path / "out").exists()


def test_uniform_is_the_default_and_changes_nothing() -> None:
    ids = calib()
    plain, explicit = tiny_model("llama"), tiny_model("llama")
    prune(plain, Wanda(Pattern(0.5), WandaOptions()), ids)
    method = Wanda(Pattern(0.5), WandaOptions(allocation="uniform", owl_m=5, owl_lambda=0.08))  # a re-run's recipe
    prune(explicit, method, ids)
    assert method.allocation_report() is None and method.allocation_pass() is None
    for p, q in zip(plain.parameters(), explicit.parameters(), strict=True):
        assert torch.equal(p, q)
