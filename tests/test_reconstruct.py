"""Reconstruction as a shared step (``method.reconstruct``, ``method.reconstruct_solver``): Wanda and
magnitude re-solve their kept weights with the solvers Barber uses, SparseGPT's ``exact`` re-solve,
per-linear calibration, end to end with save and reload, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.engine.capture import capture_layer_inputs
from llmprune.engine.context import calibration_mode
from llmprune.engine.engine import LayerContext, run_layerwise
from llmprune.errors import LLMPruneError
from llmprune.methods.magnitude import Magnitude, MagnitudeOptions
from llmprune.methods.sparsegpt import SparseGPT, SparseGPTOptions
from llmprune.methods.wanda import Wanda, WandaOptions
from llmprune.models.view import model_view
from llmprune.sparsity.exact_solver import damped_hessian, masked_least_squares
from llmprune.sparsity.obs_solver import sparsegpt_prune
from llmprune.sparsity.patterns import Pattern
from llmprune.sparsity.reconstruct import reconstruct
from llmprune.sparsity.scores import magnitude, wanda
from llmprune.sparsity.select import prune_mask

from .conftest import ByteTokenizer, tiny_model

CPU = torch.device("cpu")


def calib(n: int = 4, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def prune(model: torch.nn.Module, method: Any, ids: torch.Tensor) -> list[dict[str, Any]]:
    view = model_view(model)
    method.validate(view)
    return run_layerwise(view, method, ids, device=CPU)


def layer0_hessians(model: torch.nn.Module, ids: torch.Tensor, one_batch: bool = False) -> dict[str, torch.Tensor]:
    """X^T X of every linear of layer 0 of the dense model, as the engine observes it (batches of one
    window, or all in one batch as ``sequential=linear`` runs)."""
    view = model_view(model)
    with calibration_mode(model):
        inputs = capture_layer_inputs(model, view.layer_list, [ids] if one_batch else list(ids.split(1)), device=CPU,
                                      cache_device=CPU)
        ctx = LayerContext(view.layers[0], CPU, CPU, inputs.hidden, inputs.args[0], inputs.kwargs[0])
        stats = ctx.observe(hessian=True, moments=False)
    return {name: st.hessian.clone() for name, st in stats.items()}


def objective(w: torch.Tensor, w0: torch.Tensor, h: torch.Tensor) -> float:
    d = (w.float() - w0.float()).double()
    return float(torch.einsum("ri,ij,rj->", d, damped_hessian(h, 0.01)[0].double(), d))


@pytest.mark.parametrize("solver", ["obs", "exact"])
@pytest.mark.parametrize("sequential", ["layer", "linear"])
def test_reconstruct_over_wanda_is_the_solver_run_on_wandas_mask(solver: str, sequential: str) -> None:
    ids = calib()
    dense = tiny_model("llama")
    hessians = layer0_hessians(dense, ids, one_batch=sequential == "linear")
    model = tiny_model("llama")
    method = Wanda(Pattern(0.5), WandaOptions(reconstruct=True, reconstruct_solver=solver, sequential=sequential))
    assert method.stats == "hessian"
    prune(model, method, ids)
    dense_layer, layer = model_view(dense).layers[0], model_view(model).layers[0]
    # sequential=linear: q/k/v and gate/up read inputs no pruned linear has touched yet
    names = [n for n in layer.linears if sequential == "layer" or n.endswith(("q_proj", "k_proj", "v_proj"))]
    for name in names:
        w0, h = dense_layer.linears[name].weight.detach(), hessians[name]
        mask = prune_mask(wanda(w0, torch.diagonal(h)), Pattern(0.5))  # Wanda's ||X_j||^2 is X^T X's diagonal
        if solver == "obs":
            expected, _ = sparsegpt_prune(w0, h, Pattern(0.0), mask=mask)
        else:
            expected = masked_least_squares(w0, h, mask)
        got = layer.linears[name].weight.detach()
        assert torch.equal(got == 0, mask), name
        if solver == "obs" or sequential == "linear":  # the very same solve
            assert torch.equal(got, expected), name
        else:  # q/k/v stacked: the conjugate gradients stop on the group's objective
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
        plain = w0.masked_fill(mask, 0.0)
        assert objective(got, w0, h) < objective(plain, w0, h), name


def test_reconstruct_over_magnitude_needs_calibration_and_keeps_its_mask() -> None:
    ids = calib()
    method = Magnitude(Pattern(0.5, scope="matrix"), MagnitudeOptions(reconstruct=True, reconstruct_solver="exact"))
    assert method.needs_calibration and method.calibration_needed and method.stats == "hessian"
    dense, model = tiny_model("llama"), tiny_model("llama")
    prune(model, method, ids)
    for d, lin in zip(model_view(dense).layers[0].linears.values(), model_view(model).layers[0].linears.values(),
                      strict=True):
        mask = prune_mask(magnitude(d.weight), Pattern(0.5, scope="matrix"))
        assert torch.equal(lin.weight == 0, mask)
        assert not torch.equal(lin.weight, d.weight.masked_fill(mask, 0.0))


def test_the_shared_step_solves_linears_sharing_an_input_as_one_by_one() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 24, generator=g)
    h = x.T @ x
    weights = [torch.randn(8, 24, generator=g), torch.randn(5, 24, generator=g)]
    masks = [torch.rand(w.shape, generator=g) < 0.5 for w in weights]
    together = reconstruct(weights, h, masks, "obs")
    for w, m, t in zip(weights, masks, together, strict=True):
        assert torch.equal(t, sparsegpt_prune(w, h, Pattern(0.0), mask=m)[0])
    exact = reconstruct(weights, h, masks, "exact")
    for w, m, t in zip(weights, masks, exact, strict=True):
        torch.testing.assert_close(t, masked_least_squares(w, h, m, method="cholesky"), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one mask"):
        reconstruct(weights, h, masks[:1], "obs")


def test_sparsegpt_exact_keeps_its_mask_and_never_raises_the_error() -> None:
    ids = calib()
    dense = tiny_model("llama")
    hessians = layer0_hessians(dense, ids)
    assert SparseGPTOptions().reconstruct_solver == "obs"  # the default is SparseGPT itself
    runs = {}
    for solver in ("obs", "exact"):
        model = tiny_model("llama")
        prune(model, SparseGPT(Pattern(0.5, scope="matrix"), SparseGPTOptions(reconstruct_solver=solver)), ids)
        runs[solver] = model_view(model).layers[0].linears
    for name, lin in model_view(dense).layers[0].linears.items():
        obs, exact = runs["obs"][name].weight.detach(), runs["exact"][name].weight.detach()
        assert torch.equal(obs == 0, exact == 0) and not torch.equal(obs, exact), name
        w0, h = lin.weight.detach(), hessians[name]
        assert objective(exact, w0, h) <= objective(obs, w0, h) * (1 + 1e-6), name
        direct = masked_least_squares(w0, h, obs == 0, method="cholesky")  # the exact solution, directly
        assert objective(exact, w0, h) == pytest.approx(objective(direct, w0, h), rel=1e-4), name


@pytest.mark.parametrize(("method", "options"), [
    ("wanda", {"reconstruct": True, "reconstruct_solver": "exact", "allocation": "owl", "owl_m": 3}),
    ("magnitude", {"reconstruct": True}),
    ("sparsegpt", {"reconstruct_solver": "exact", "sequential": "linear"}),
])
def test_end_to_end_through_the_api_with_save_and_reload(method: str, options: dict[str, Any], tiny_model_dir,
                                                         calib_file: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = llmprune.prune(str(tiny_model_dir("llama")), method=method, sparsity=0.5, calib_dataset=str(calib_file),
                            nsamples=4, seqlen=32, eval=None, data_dir=str(data_dir), output=str(out),
                            method_options=options)
    report = json.loads((out / "llmprune.json").read_text())
    assert report["calibration"] is not None and report["calibration"]["nsamples"] == 4
    for key, value in options.items():
        assert report["recipe"]["method"][key] == value
    assert report["sparsity"]["overall"] == pytest.approx(0.5, abs=0.03)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, p), q in zip(result.model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "wanda", "method_options": {"reconstruct_solver": "exact"}},
     "wanda option reconstruct_solver=exact .* reconstruct is off; add method.reconstruct=true"),
    ({"method": "magnitude", "method_options": {"reconstruct_solver": "exact"}},
     "magnitude option reconstruct_solver=exact .* reconstruct is off"),
    ({"method": "wanda", "method_options": {"reconstruct": True, "reconstruct_solver": "admm"}},
     r"method.reconstruct_solver: Input should be 'obs' or 'exact'"),
    ({"method": "sparsegpt", "method_options": {"reconstruct": True}},
     r"method.reconstruct is an option of .*not applicable to method sparsegpt \(sparsegpt reconstructs by itself"),
    ({"method": "cfsp", "method_options": {"reconstruct": True}}, "not applicable to method cfsp"),
])
def test_bad_input_fails_before_any_work(kwargs: dict[str, Any], message: str, calib_file: Path) -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args: dict[str, Any] = {"sparsity": 0.5, "calib_dataset": str(calib_file), "nsamples": 2, "seqlen": 16, **kwargs}
    with pytest.raises(LLMPruneError, match=message):
        llmprune.prune(model, tokenizer=ByteTokenizer(), **args)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
