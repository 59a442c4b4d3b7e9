"""LLM-Barber end to end: the gradient it uses, every family, exact sparsity, bad input, SmolLM2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import llmprune
from llmprune.engine.capture import capture_layer_inputs
from llmprune.engine.context import calibration_mode
from llmprune.engine.engine import LayerContext, run_layerwise
from llmprune.errors import LLMPruneError
from llmprune.methods.barber import Barber, BarberOptions, SubBlock, _Records, dense_grad_sq
from llmprune.methods.magnitude import Magnitude, MagnitudeOptions
from llmprune.methods.sparsegpt import SparseGPT, SparseGPTOptions
from llmprune.methods.wanda import Wanda, WandaOptions
from llmprune.models.view import model_view
from llmprune.recipe import load_recipe
from llmprune.sparsity.patterns import Pattern

from .conftest import REPO, ByteTokenizer, tiny_model

CPU = torch.device("cpu")
UNSTRUCTURED, TWO_FOUR = Pattern(0.5), Pattern(0.5, n=2, m=4)


def calib(n: int = 4, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{layer.index}.{name}": lin.weight.detach().clone()
            for layer in model_view(model).layers for name, lin in layer.linears.items()}


def prune(model: torch.nn.Module, method: Any, ids: torch.Tensor) -> list[dict[str, Any]]:
    view = model_view(model)
    method.validate(view)
    return run_layerwise(view, method, ids, device=CPU)


# ---------------------------------------------------------------- (a) the gradient Barber uses


def first_layer_context(model: torch.nn.Module, ids: torch.Tensor) -> LayerContext:
    view = model_view(model)
    with calibration_mode(model):
        inputs = capture_layer_inputs(model, view.layer_list, list(ids.split(1)), device=CPU, cache_device=CPU)
    return LayerContext(view.layers[0], CPU, CPU, inputs.hidden, inputs.args[0], inputs.kwargs[0])


@pytest.mark.parametrize(("family", "kind"), [("llama", "attn"), ("llama", "mlp"), ("mistral", "attn"), ("opt", "mlp")])
def test_gradient_matches_finite_differences(family: str, kind: str) -> None:
    """G = mean over samples (one per batch here) of (d MSE(y_s, y_d) / d W_dense)^2, checked entry by entry in float64.

    Covers a sub-block module run on its recorded kwargs (attention with rotary embeddings and a
    sliding-window mask) and OPT's MLP, replayed through the layer with hooks (no MLP module).
    """
    model = tiny_model(family).double()
    ctx = first_layer_context(model, calib(n=2, seqlen=12))
    block = SubBlock.find(ctx.layer, kind)
    assert block.replay == (family == "opt")
    dense = block.snapshot(torch.float64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the "initializer": prune the live weights at random
        for lin in block.linears.values():
            lin.weight.masked_fill_(torch.rand(lin.weight.shape, generator=gen) < 0.5, 0.0)
        records = _Records(ctx, block, keep=True)
        targets = list(records.targets())
        weights = {name: dense[f"{block.rel[name]}.weight"] for name in block.linears}
        grad_sq, _, mse = dense_grad_sq(lambda b: records.run(b, dense, torch.float64), targets, weights, [1, 1])
        assert mse > 0

        def loss(b: int) -> float:
            return float(F.mse_loss(records.run(b, dense, torch.float64), targets[b].double()))

        eps = 1e-6
        for name, w in weights.items():
            flat = w.view(-1)
            for i in torch.randperm(flat.numel(), generator=gen)[:6].tolist():
                per_batch = []
                for b in range(ctx.num_batches):
                    original = flat[i].item()
                    flat[i] = original + eps
                    up = loss(b)
                    flat[i] = original - eps
                    down = loss(b)
                    flat[i] = original
                    per_batch.append((up - down) / (2 * eps))
                expected = sum(g * g for g in per_batch) / len(per_batch)
                got = float(grad_sq[name].view(-1)[i])
                assert got == pytest.approx(expected, rel=1e-5, abs=1e-14), (name, i)


def test_running_mean_is_over_samples_not_batches() -> None:
    """A batch of three samples counts as three: G is the mean of each sample's squared gradient."""
    w = torch.tensor([[2.0]])
    inputs = [torch.tensor([[1.0]]), torch.tensor([[3.0], [1.0], [-2.0]])]
    targets = [torch.tensor([[1.0]]), torch.tensor([[0.0], [1.0], [0.5]])]
    grad_sq, _, _ = dense_grad_sq(lambda b: inputs[b] @ w.t(), targets, {"w": w}, [1, 3])
    xs, ts = [1.0, 3.0, 1.0, -2.0], [1.0, 0.0, 1.0, 0.5]
    g = [2 * (2 * x - t) * x for x, t in zip(xs, ts, strict=True)]  # d/dw (w x - t)^2 = 2 (w x - t) x
    assert float(grad_sq["w"]) == pytest.approx(sum(v * v for v in g) / 4)
    assert not w.requires_grad


def randomly_pruned(family: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A float64 tiny model whose first layer is pruned at random, and that layer's dense weights."""
    model = tiny_model(family).double()
    layer = model_view(model).layers[0]
    dense = {name: p.detach().clone() for name, p in layer.module.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lin in layer.linears.values():
            lin.weight.masked_fill_(torch.rand(lin.weight.shape, generator=gen) < 0.5, 0.0)
    return model, dense


def dense_params(block: SubBlock, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dense weights keyed as :meth:`SubBlock.snapshot` keys them (float64 copies)."""
    live = block.snapshot(torch.float64)
    prefix = "" if block.replay else next(n for n, m in block.layer.module.named_modules() if m is block.runner) + "."
    return {name: dense[prefix + name].clone() for name in live}


def per_sample_grad_sq(family: str, ids: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """An independent G: one sample at a time, torch.autograd.grad, squares averaged at the end."""
    model, dense_layer = randomly_pruned(family)
    ctx = first_layer_context(model, ids)
    block = SubBlock.find(ctx.layer, kind)
    dense = dense_params(block, dense_layer)
    records = _Records(ctx, block, keep=True)
    weights = {name: dense[f"{block.rel[name]}.weight"].requires_grad_(True) for name in block.linears}
    squares: dict[str, list[torch.Tensor]] = {name: [] for name in weights}
    for b, target in enumerate(records.targets()):
        loss = F.mse_loss(records.run(b, dense, torch.float64), target.double())
        for name, g in zip(weights, torch.autograd.grad(loss, list(weights.values())), strict=True):
            squares[name].append(g.pow(2))
    return {name: torch.stack(sq).mean(dim=0) for name, sq in squares.items()}


@pytest.mark.parametrize(("family", "kind"), [("llama", "attn"), ("llama", "mlp"), ("opt", "mlp")])
@pytest.mark.parametrize("batch_size", [1, 3, 6])
def test_grad_sq_is_the_per_sample_mean_at_any_batch_size(family: str, kind: str, batch_size: int) -> None:
    ids = calib(n=6, seqlen=10)
    expected = per_sample_grad_sq(family, ids, kind)
    assert all(float(g.max()) > 0 for g in expected.values())
    model, dense_layer = randomly_pruned(family)
    view = model_view(model)
    with calibration_mode(model):
        inputs = capture_layer_inputs(model, view.layer_list, list(ids.split(batch_size)), device=CPU, cache_device=CPU)
    ctx = LayerContext(view.layers[0], CPU, CPU, inputs.hidden, inputs.args[0], inputs.kwargs[0])
    block = SubBlock.find(ctx.layer, kind)
    dense = dense_params(block, dense_layer)
    records = _Records(ctx, block, keep=True)
    weights = {name: dense[f"{block.rel[name]}.weight"] for name in block.linears}
    grad_sq, _, _ = dense_grad_sq(lambda b: records.run(b, dense, torch.float64), records.targets(), weights,
                                  [records.samples(b) for b in range(ctx.num_batches)])
    for name in weights:
        torch.testing.assert_close(grad_sq[name], expected[name], rtol=1e-9, atol=1e-12 * float(expected[name].max()))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_masks_do_not_depend_on_the_batch_size(family: str) -> None:
    ids = calib(n=6, seqlen=16)
    masks = []
    for batch_size in (1, 3, 6):
        model = tiny_model(family)
        view = model_view(model)
        method = Barber(UNSTRUCTURED, BarberOptions(init="wanda", ratio=0.3))
        method.validate(view)
        run_layerwise(view, method, ids, device=CPU, batch_size=batch_size)
        masks.append({k: w == 0 for k, w in weights_of(model).items()})
    for other in masks[1:]:
        for key, mask in masks[0].items():
            assert int((mask != other[key]).sum()) == 0, key


def test_gradient_of_every_weight_is_required() -> None:
    """G is folded weight by weight during the backward: a weight the output does not depend on
    would silently keep a stale G, so it is refused."""
    w, unused = torch.tensor([[2.0]]), torch.tensor([[1.0]])
    with pytest.raises(RuntimeError, match="does not depend on"):
        dense_grad_sq(lambda b: torch.ones(1, 1) @ w.t(), [torch.zeros(1, 1)], {"w": w, "unused": unused}, [1])
    assert not w.requires_grad and w.grad is None and not unused.requires_grad


# ---------------------------------------------------------------- (b) end to end on every family


@pytest.mark.parametrize(("pattern", "nm_rule"), [(UNSTRUCTURED, "reference"), (TWO_FOUR, "reference"),
                                                  (TWO_FOUR, "paired")], ids=["unstructured50", "2of4", "2of4-paired"])
def test_every_family_keeps_the_init_sparsity(family: str, pattern: Pattern, nm_rule: str) -> None:
    ids = calib()
    init = tiny_model(family)
    prune(init, Wanda(pattern, WandaOptions()), ids)
    dense = weights_of(tiny_model(family))
    model = tiny_model(family)
    reports = prune(model, Barber(pattern, BarberOptions(ratio=0.5, nm_rule=nm_rule)), ids)

    first_layer_swaps = 0
    for name, w in weights_of(model).items():
        w_init = weights_of(init)[name]
        assert int((w == 0).sum()) == int((w_init == 0).sum()), name  # per linear, per layer
        if pattern.is_nm:
            kept = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
            assert bool((kept == 2).all()), name
        kept_mask = w != 0
        torch.testing.assert_close(w[kept_mask], dense[name][kept_mask], rtol=0, atol=0)  # dense values
        if name.startswith("0."):  # layer 0 sees the same inputs in both runs, hence the same init mask
            first_layer_swaps += int(((w_init == 0) & kept_mask).sum())
    assert first_layer_swaps > 0
    assert first_layer_swaps == sum(reports[0]["swaps"].values())
    for report in reports:
        assert set(report) >= {"sparsity", "swaps", "reconstruction", "time_s"}
        assert set(report["swaps"]) == set(report["sparsity"])
        for kind in ("attn", "mlp"):
            errors = report["reconstruction"][kind]
            assert 0 < errors["mse_before"] < float("inf") and 0 <= errors["mse_after"] < float("inf")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_final_forward_replays_the_rebuilt_attention_bit_for_bit(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The layer's last forward reuses the attention outputs recorded in the MLP's capture instead of
    recomputing them: the same weights, reports and propagated activations as recomputing."""
    from contextlib import nullcontext

    from llmprune.methods import barber

    ids = calib()
    options = BarberOptions(ratio=0.2, reconstruct=True)
    used: list[int] = []
    real = barber._replayed

    def counted(module: torch.nn.Module, outputs: list[Any], device: torch.device) -> Any:
        used.append(len(outputs))
        return real(module, outputs, device)

    monkeypatch.setattr(barber, "_replayed", counted)
    replayed = tiny_model(family)
    reports = prune(replayed, Barber(UNSTRUCTURED, options), ids)
    assert used and all(n == len(ids) for n in used)  # one replay per layer, every batch
    monkeypatch.setattr(barber, "_replayed", lambda *_args: nullcontext())
    recomputed = tiny_model(family)
    again = prune(recomputed, Barber(UNSTRUCTURED, options), ids)
    assert [{k: v for k, v in r.items() if k != "time_s"} for r in again] == [
        {k: v for k, v in r.items() if k != "time_s"} for r in reports]
    for name, w in weights_of(replayed).items():
        assert torch.equal(w, weights_of(recomputed)[name]), name
    with torch.no_grad():
        assert torch.equal(replayed(ids).logits, recomputed(ids).logits)


@pytest.mark.parametrize("guard", [False, True], ids=["default", "guard"])
def test_spent_activations_are_released(monkeypatch: pytest.MonkeyPatch, guard: bool) -> None:
    """Barber holds the recorded activations of one calibration batch at a time (at 32 x 2048
    calibration tokens each copy for all of them is as large as SmolLM2's weights): on the default
    path each batch's record is dropped once its gradient is taken; where the records must be kept
    (``guard`` re-runs the rebuilt sub-block on them) a pass's records are freed before the next
    pass records its own. The dense outputs go as soon as the error they serve is measured."""
    import weakref

    from llmprune.methods import barber

    made: list[weakref.ref[Any]] = []
    live: list[int] = []  # at each batch: populated records over every _Records still alive
    released: list[bool] = []
    made_out: list[list[weakref.ref[torch.Tensor]]] = []
    real_targets, real_init, real_mse = barber._Records.targets, barber._ErrorAfter.__init__, barber._ErrorAfter.mse

    def targets(self: Any) -> Any:
        made.append(weakref.ref(self))
        for y in real_targets(self):
            live.append(sum(y is not None for ref in made if ref() is not None for y in ref().pruned_out))
            yield y

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        made_out.append([weakref.ref(t) for t in self.dense_out])

    def mse(self: Any) -> float:
        value = real_mse(self)
        released.append(all(ref() is None for ref in made_out.pop(0)))
        return value

    monkeypatch.setattr(barber._Records, "targets", targets)
    monkeypatch.setattr(barber._ErrorAfter, "__init__", init)
    monkeypatch.setattr(barber._ErrorAfter, "mse", mse)
    model = tiny_model("llama")
    ids = calib(n=4)
    prune(model, Barber(UNSTRUCTURED, BarberOptions(ratio=0.2, guard=guard)), ids)
    blocks = 2 * len(model_view(model).layers)
    per_pass = [1] * len(ids) if not guard else list(range(1, len(ids) + 1))
    assert live == per_pass * blocks
    assert released == ([] if guard else [True] * blocks)


def test_ratio_zero_is_the_initializer_alone() -> None:
    ids = calib()
    for family in ("llama", "opt"):
        for pattern in (UNSTRUCTURED, TWO_FOUR):
            init, model = tiny_model(family), tiny_model(family)
            prune(init, Wanda(pattern, WandaOptions()), ids)
            reports = prune(model, Barber(pattern, BarberOptions(ratio=0.0)), ids)
            for name, w in weights_of(model).items():
                assert torch.equal(w, weights_of(init)[name]), (family, name)
            assert all(sum(r["swaps"].values()) == 0 for r in reports)


def test_sparsegpt_reconstruction_discarded_or_retained() -> None:
    ids, pattern = calib(), Pattern(0.5, scope="matrix")
    sgpt = tiny_model("llama")
    prune(sgpt, SparseGPT(pattern, SparseGPTOptions()), ids)
    retained = tiny_model("llama")
    prune(retained, Barber(pattern, BarberOptions(init="sparsegpt", ratio=0.0, retain_reconstruction=True)), ids)
    for name, w in weights_of(retained).items():
        assert torch.equal(w, weights_of(sgpt)[name]), name  # the reconstruction kept, bit for bit
    dense = weights_of(tiny_model("llama"))
    model = tiny_model("llama")
    prune(model, Barber(pattern, BarberOptions(init="sparsegpt", granularity="layer", ratio=0.1)), ids)
    for name, w in weights_of(model).items():
        assert int((w == 0).sum()) == int(0.5 * w.numel()), name
        assert torch.equal(w[w != 0], dense[name][w != 0]), name


@pytest.mark.parametrize("pattern", [Pattern(0.5, scope="matrix"), TWO_FOUR], ids=str)
def test_reconstruct_at_ratio_zero_is_sparsegpt_and_lowers_the_error_of_a_rebuilt_mask(pattern: Pattern) -> None:
    ids = calib()
    sgpt, model = tiny_model("llama"), tiny_model("llama")
    prune(sgpt, SparseGPT(pattern, SparseGPTOptions()), ids)
    prune(model, Barber(pattern, BarberOptions(init="sparsegpt", ratio=0.0, reconstruct=True)), ids)
    for name, w in weights_of(model).items():
        assert torch.equal(w, weights_of(sgpt)[name]), name  # SparseGPT's own mask re-solved: SparseGPT itself
    options = dict(init="wanda", granularity="layer", ratio=0.3)
    plain, solved = tiny_model("llama"), tiny_model("llama")
    plain_reports = prune(plain, Barber(pattern, BarberOptions(**options)), ids)
    method = Barber(pattern, BarberOptions(**options, reconstruct=True))
    assert method.stats == "hessian"
    reports = prune(solved, method, ids)
    # Layer 0's attention sees the same inputs and gradients in both runs: the same rebuilt masks,
    # dense values against OBS-reconstructed ones.
    for name in model_view(solved).layers[0].linears:
        if name.startswith("self_attn"):
            w, p = weights_of(solved)[f"0.{name}"], weights_of(plain)[f"0.{name}"]
            assert torch.equal(w == 0, p == 0) and not torch.equal(w, p), name
    attn_swaps = [{n: c for n, c in r[0]["swaps"].items() if n.startswith("self_attn")} for r in (reports, plain_reports)]
    assert attn_swaps[0] == attn_swaps[1] and sum(attn_swaps[0].values()) > 0
    assert reports[0]["reconstruction"]["attn"]["mse_after"] < plain_reports[0]["reconstruction"]["attn"]["mse_after"]
    for name, w in weights_of(solved).items():
        if pattern.is_nm:
            assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()), name
        assert int((w == 0).sum()) >= int(0.5 * w.numel()), name


@pytest.mark.parametrize("pattern", [Pattern(0.5, scope="matrix"), TWO_FOUR], ids=str)
def test_the_exact_solver_keeps_the_masks_and_lowers_the_error(pattern: Pattern) -> None:
    """``reconstruct_solver=exact``: SparseGPT's masks at ratio 0 with other values; at ratio > 0 the
    same swaps in layer 0's attention as the OBS solver and a lower error after rebuilding."""
    runs = {}
    ids = calib()
    sgpt, model = tiny_model("llama"), tiny_model("llama")
    prune(sgpt, SparseGPT(pattern, SparseGPTOptions()), ids)
    prune(model, Barber(pattern, BarberOptions(init="sparsegpt", ratio=0.0, reconstruct=True,
                                               reconstruct_solver="exact")), ids)
    reference = weights_of(sgpt)
    for name, w in weights_of(model).items():  # layer 0: the same inputs (later ones see other outputs)
        if name.startswith("0."):
            assert torch.equal(w == 0, reference[name] == 0) and not torch.equal(w, reference[name]), name
    for solver in ("obs", "exact"):
        net = tiny_model("llama")
        options = BarberOptions(init="wanda", granularity="output", ratio=0.3, reconstruct=True, reconstruct_solver=solver)
        runs[solver] = (net, prune(net, Barber(pattern, options), ids))
    (obs_model, obs_reports), (exact_model, exact_reports) = runs["obs"], runs["exact"]
    attn = [{n: c for n, c in r[0]["swaps"].items() if n.startswith("self_attn")} for r in (obs_reports, exact_reports)]
    assert attn[0] == attn[1] and sum(attn[0].values()) > 0  # the MLP sees a different attention output
    assert exact_reports[0]["reconstruction"]["attn"]["mse_after"] < obs_reports[0]["reconstruction"]["attn"]["mse_after"]
    exact_weights, obs_weights = weights_of(exact_model), weights_of(obs_model)
    for name in model_view(exact_model).layers[0].linears:
        if name.startswith("self_attn"):
            w, p = exact_weights[f"0.{name}"], obs_weights[f"0.{name}"]
            assert torch.equal(w == 0, p == 0) and not torch.equal(w, p), name


@pytest.mark.parametrize("pattern", [TWO_FOUR, Pattern(0.5, scope="row"), Pattern(0.5, scope="matrix")], ids=str)
def test_sparsegpt_solves_linears_sharing_an_input_together_with_the_same_result(
        pattern: Pattern, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmprune.methods.base import Method

    ids = calib()
    stacked, alone = tiny_model("qwen2"), tiny_model("qwen2")
    prune(stacked, SparseGPT(pattern, SparseGPTOptions(scope=pattern.scope)), ids)
    monkeypatch.setattr(SparseGPT, "prune_layer", Method.prune_layer)  # one linear at a time
    prune(alone, SparseGPT(pattern, SparseGPTOptions(scope=pattern.scope)), ids)
    for name, w in weights_of(stacked).items():
        assert torch.equal(w, weights_of(alone)[name]), name


def test_magnitude_init_block_granularity_keeps_each_sub_block_total() -> None:
    ids, pattern = calib(), Pattern(0.5, scope="matrix")
    init, model = tiny_model("qwen3"), tiny_model("qwen3")
    prune(init, Magnitude(pattern, MagnitudeOptions()), ids)
    method = Barber(pattern, BarberOptions(init="magnitude", granularity="block", ratio=0.5))
    assert method.stats is None
    reports = prune(model, method, ids)
    view, init_view = model_view(model), model_view(init)
    drift = 0
    for layer, init_layer in zip(view.layers, init_view.layers, strict=True):
        for kind in ("attn", "mlp"):
            names = SubBlock.find(layer, kind).rel
            zeros = {n: int((layer.linears[n].weight == 0).sum()) for n in names}
            init_zeros = {n: int((init_layer.linears[n].weight == 0).sum()) for n in names}
            assert sum(zeros.values()) == sum(init_zeros.values())
            drift += sum(abs(zeros[n] - init_zeros[n]) for n in names)
    assert drift > 0  # block granularity does move sparsity between matrices
    assert all(r["reconstruction"]["mlp"]["mse_after"] < r["reconstruction"]["mlp"]["mse_before"] for r in reports)


def test_n_of_m_beyond_two_of_four_with_layer_granularity() -> None:
    ids, pattern = calib(), Pattern(0.75, n=1, m=4)
    model = tiny_model("mistral")
    prune(model, Barber(pattern, BarberOptions(granularity="layer", ratio=0.5)), ids)
    for name, w in weights_of(model).items():
        assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 1).all()), name


# ---------------------------------------------------------------- API, recipes and (c) bad input


def test_api_and_reference_recipes(calib_file: Path) -> None:
    model = tiny_model("gemma3")
    result = llmprune.prune(model, tokenizer=ByteTokenizer(), method="barber", pattern="2:4",
                            calib_dataset=str(calib_file), nsamples=4, seqlen=32,
                            method_options={"init": "sparsegpt", "granularity": "block", "ratio": 0.2})
    assert result.report["sparsity"]["nm_valid"] is True and result.report["sparsity"]["overall"] == 0.5
    method = result.report["recipe"]["method"]
    assert method["init"] == "sparsegpt" and method["scope"] == "matrix" and method["score"] == "WD"
    presets = {"barber_wanda.yaml": ("wanda", "output", 0.01), "barber_magnitude.yaml": ("magnitude", "block", 0.1),
               "barber_sparsegpt.yaml": ("sparsegpt", "layer", 0.1)}
    for file, (init, granularity, ratio) in presets.items():
        path = REPO / "recipes" / file
        assert path.read_text().startswith(f"# llmprune prune --recipe recipes/{file}")
        recipe = load_recipe(path)
        assert recipe.method.name == "barber"
        options = BarberOptions(**recipe.method.options)
        assert (options.init, options.granularity, options.ratio) == (init, granularity, ratio)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sparsity": 0.0}, "nothing to rebuild"),
    ({"sparsity": 0.005}, "prunes no weight"),
    ({"method_options": {"ratio": 1.5}}, "ratio"),
    ({"method_options": {"ratio": -0.1}}, "ratio"),
    ({"pattern": "2:4", "sparsity": None, "method_options": {"granularity": "input"}}, "granularity 'input'"),
    ({"method_options": {"init": "obc"}}, "init"),
    ({"method_options": {"granularity": "row"}}, "granularity"),
    ({"method_options": {"fraction": 0.1}}, "fraction"),
    ({"method_options": {"reconstruct": True, "retain_reconstruction": True}}, "exclude each other"),
    ({"method_options": {"reconstruct_solver": "exact"}}, "reconstruct is off"),
    ({"method_options": {"reconstruct": True, "reconstruct_solver": "admm"}}, "reconstruct_solver"),
])
def test_bad_input_fails_before_any_work(kwargs: dict[str, Any], message: str, calib_file: Path) -> None:
    model = tiny_model("llama")
    before = weights_of(model)
    args: dict[str, Any] = {"method": "barber", "sparsity": 0.5, "calib_dataset": str(calib_file), "nsamples": 2,
                            "seqlen": 16, **kwargs}
    with pytest.raises(LLMPruneError, match=message):
        llmprune.prune(model, tokenizer=ByteTokenizer(), **args)
    assert all(torch.equal(w, before[name]) for name, w in weights_of(model).items())


def test_direct_construction_checks() -> None:
    with pytest.raises(LLMPruneError, match="nothing to rebuild"):
        Barber(Pattern(0.0), BarberOptions())
    for granularity in ("output", "layer", "block"):
        Barber(TWO_FOUR, BarberOptions(granularity=granularity))
    with pytest.raises(LLMPruneError, match="N:M"):
        Barber(TWO_FOUR, BarberOptions(granularity="input"))
    assert Barber(UNSTRUCTURED, BarberOptions(init="sparsegpt")).stats == "hessian"
    assert BarberOptions(init="magnitude").scope == "matrix" and BarberOptions().scope == "row"


def test_guard_keeps_the_initializer_where_rebuilding_hurts() -> None:
    ids, pattern = calib(), UNSTRUCTURED
    init, plain, guarded = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    prune(init, Wanda(pattern, WandaOptions()), ids)
    options = dict(ratio=1.0, score="W", granularity="layer")  # a harmful setting: magnitude order over Wanda's
    plain_reports = prune(plain, Barber(pattern, BarberOptions(**options)), ids)
    reports = prune(guarded, Barber(pattern, BarberOptions(**options, guard=True)), ids)
    first = plain_reports[0]["reconstruction"]["attn"]
    assert first["mse_after"] > first["mse_before"]  # the same inputs as the guarded run's first sub-block
    reverted = 0
    for report in reports:
        for kind, errors in report["reconstruction"].items():
            names = [n for n in report["swaps"] if (n.startswith("self_attn") == (kind == "attn"))]
            if errors.get("reverted"):
                reverted += 1
                assert all(report["swaps"][n] == 0 for n in names), (report["layer"], kind)
            else:
                assert errors["mse_after"] <= errors["mse_before"], (report["layer"], kind)
    assert reverted >= 1
    assert reports[0]["reconstruction"]["attn"].get("reverted") is True
    for name, w in weights_of(guarded).items():
        if name.startswith("0.self_attn"):
            assert torch.equal(w, weights_of(init)[name]), name  # the initializer's sub-block, bit for bit
        assert int((w == 0).sum()) == int((weights_of(init)[name] == 0).sum()), name


def test_nm_rule_auto_is_the_papers_rule_at_output_and_paired_at_layer_and_block() -> None:
    assert BarberOptions().nm_rule == "reference"  # output granularity: the paper's N:M rule
    assert BarberOptions(granularity="layer").nm_rule == "paired"
    assert BarberOptions(granularity="block", nm_rule="auto").nm_rule == "paired"
    assert BarberOptions(granularity="block", nm_rule="reference").nm_rule == "reference"  # asked for: kept
    assert BarberOptions(granularity="output", nm_rule="paired").nm_rule == "paired"
    with pytest.raises(ValueError):
        BarberOptions(nm_rule="greedy")
    # The resolved rule is what a run records, and what it applies.
    ids = calib()
    auto = Barber(TWO_FOUR, BarberOptions(init="magnitude", granularity="layer", ratio=0.5))
    assert auto.options.nm_rule == "paired"
    a, b = tiny_model("llama"), tiny_model("llama")
    prune(a, auto, ids)
    prune(b, Barber(TWO_FOUR, BarberOptions(init="magnitude", granularity="layer", ratio=0.5, nm_rule="paired")), ids)
    assert any(not torch.equal(pa, pd) for pa, pd in zip(a.parameters(), tiny_model("llama").parameters(), strict=True))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


# ---------------------------------------------------------------- method.order


def test_reference_order_initializes_every_layer_before_rebuilding() -> None:
    """order=reference equals the initializer over the whole model followed by the rebuild of each layer
    from the dense weights, which here is checked by hand: the init pass alone gives the initializer's
    model, and the rebuild pass only changes the masks by the reported swaps."""
    ids = calib()
    init_model = tiny_model("llama")
    prune(init_model, Wanda(UNSTRUCTURED, WandaOptions()), ids)
    init_masks = {k: w == 0 for k, w in weights_of(init_model).items()}

    model = tiny_model("llama")
    reports = prune(model, Barber(UNSTRUCTURED, BarberOptions(init="wanda", ratio=0.3, order="reference")), ids)
    layered = tiny_model("llama")
    prune(layered, Barber(UNSTRUCTURED, BarberOptions(init="wanda", ratio=0.3, order="layer")), ids)
    dense = weights_of(tiny_model("llama"))
    for report in reports:
        for name, swaps in report["swaps"].items():
            key = f"{report['layer']}.{name}"
            mask = model_view(model).layers[report["layer"]].linears[name].weight == 0
            assert int((init_masks[key] & ~mask).sum()) == swaps  # grown = pruned back, counted from the init mask
            assert torch.equal(model_view(model).layers[report["layer"]].linears[name].weight[~mask], dense[key][~mask])
    # layer 0 sees the same inputs in both orders; later layers' initial masks differ
    got, other = weights_of(model), weights_of(layered)
    assert all(torch.equal(got[k], other[k]) for k in got if k.startswith("0."))
    assert any(not torch.equal(got[k], other[k]) for k in got if not k.startswith("0."))


def test_order_on_a_method_without_initializer_is_refused(calib_file: Path) -> None:
    with pytest.raises(LLMPruneError, match="method.order.*no initializer"):
        llmprune.prune(tiny_model("llama"), tokenizer=ByteTokenizer(), method="wanda", sparsity=0.5,
                       calib_dataset=str(calib_file), nsamples=2, seqlen=16,
                       method_options={"order": "reference"})
