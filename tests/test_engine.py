"""The layer-wise engine reproduces the model's own computation, per family, and leaves no trace."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch

from llmprune.engine.capture import capture_layer_inputs
from llmprune.engine.engine import LayerContext, run_layerwise
from llmprune.errors import LLMPruneError
from llmprune.methods.base import Method
from llmprune.models.view import model_view
from llmprune.sparsity.patterns import Pattern

from .conftest import SLIDING, tiny_model

CPU = torch.device("cpu")


class Recorder(Method):
    """A no-op method that records what the engine shows it."""

    name = "recorder"
    summary = "test only"
    stats = "sq_norm"

    def __init__(self) -> None:
        super().__init__(Pattern(0.0), Method.Options())
        self.outputs: dict[int, list[torch.Tensor]] = {}
        self.sq_norms: dict[int, dict[str, torch.Tensor]] = {}

    def prune_layer(self, ctx: LayerContext) -> dict[str, Any]:
        self.outputs[ctx.layer.index] = ctx.forward()
        self.sq_norms[ctx.layer.index] = {n: s.sq_norm.clone() for n, s in ctx.stats.items()}
        return {}


def reference_layer_outputs(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    view = model_view(model)
    outs: list[torch.Tensor] = []
    handles = [
        layer.module.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for layer in view.layers
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return outs


def calib(n: int = 3, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_noop_engine_reproduces_every_layer_exactly(family: str) -> None:
    model = tiny_model(family)
    ids = calib()
    logits_before = model(input_ids=ids).logits.detach()
    method = Recorder()
    run_layerwise(model_view(model), method, ids, device=CPU, batch_size=1)
    for b in range(ids.shape[0]):
        expected = reference_layer_outputs(model, ids[b : b + 1])
        for i, ref in enumerate(expected):
            torch.testing.assert_close(method.outputs[i][b], ref, rtol=0, atol=0)
    torch.testing.assert_close(model(input_ids=ids).logits, logits_before, rtol=0, atol=0)


def test_batched_calibration_matches_one_by_one() -> None:
    model = tiny_model("llama")
    ids = calib(4)
    one, two = Recorder(), Recorder()
    run_layerwise(model_view(model), one, ids, device=CPU, batch_size=1)
    run_layerwise(model_view(model), two, ids, device=CPU, batch_size=2)
    for name, value in one.sq_norms[2].items():
        torch.testing.assert_close(two.sq_norms[2][name], value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_layers_get_their_own_mask(family: str) -> None:
    """Reusing layer 0's arguments everywhere (the research repos' Catcher) gives wrong outputs here."""
    model = tiny_model(family)
    view = model_view(model)
    ids = calib(1, seqlen=40)
    inputs = capture_layer_inputs(model, view.layer_list, [ids], device=CPU, cache_device=CPU)
    types = [layer.attention_type for layer in view.layers]
    expected = reference_layer_outputs(model, ids)
    hidden = inputs.hidden[0]
    wrong_detected = False
    for i, layer in enumerate(view.layers):
        with torch.no_grad():
            right = layer.module(hidden, *inputs.args[i][0], **inputs.kwargs[i][0])
            right = right[0] if isinstance(right, tuple) else right
            torch.testing.assert_close(right, expected[i], rtol=0, atol=0)
            if types[i] != types[0]:
                wrong = layer.module(hidden, *inputs.args[0][0], **inputs.kwargs[0][0])
                wrong = wrong[0] if isinstance(wrong, tuple) else wrong
                wrong_detected |= not torch.allclose(wrong, expected[i], atol=1e-5)
        hidden = right
    if len(set(types)) > 1:
        assert wrong_detected, "the test model does not distinguish attention types"


def test_no_kv_cache_leaks_between_samples() -> None:
    """Statistics of N samples replayed one by one equal the sum over each sample run alone."""
    model = tiny_model("llama")
    model.config.use_cache = True  # the transformers 5 default that leaks a DynamicCache into calibration
    ids = calib(3)
    together = Recorder()
    run_layerwise(model_view(model), together, ids, device=CPU, batch_size=1)
    alone = []
    for b in range(3):
        rec = Recorder()
        run_layerwise(model_view(model), rec, ids[b : b + 1], device=CPU, batch_size=1)
        alone.append(rec)
    for layer in range(3):
        for name, value in together.sq_norms[layer].items():
            total = sum(r.sq_norms[layer][name] for r in alone)
            torch.testing.assert_close(value, total, rtol=1e-5, atol=1e-5)
    assert model.config.use_cache is True  # restored


def test_shared_inputs_share_statistics() -> None:
    model = tiny_model("llama")
    view = model_view(model)
    ctx = LayerContext(view.layers[0], CPU, CPU)
    inputs = capture_layer_inputs(model, view.layer_list, [calib(1)], device=CPU, cache_device=CPU)
    ctx.hidden, ctx.args, ctx.kwargs = inputs.hidden, inputs.args[0], inputs.kwargs[0]
    stats = ctx.observe(hessian=True)
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert stats["mlp.down_proj"] is not stats["mlp.up_proj"]
    assert stats["self_attn.q_proj"].tokens == 32


class Boom(Recorder):
    def prune_layer(self, ctx: LayerContext) -> dict[str, Any]:
        raise RuntimeError("boom")


def test_state_restored_after_error() -> None:
    model = tiny_model("llama")
    model.train()
    model.config.use_cache = True
    view = model_view(model)
    with pytest.raises(RuntimeError, match="boom"):
        run_layerwise(view, Boom(), calib(1), device=CPU)
    assert model.training and model.config.use_cache is True
    assert torch.is_grad_enabled()
    assert all("forward" not in layer.module.__dict__ for layer in view.layers)
    assert all(not layer.module._forward_pre_hooks and not layer.module._forward_hooks for layer in view.layers)
    for layer in view.layers:
        for lin in layer.linears.values():
            assert not lin._forward_pre_hooks


def test_nonfinite_activations_are_reported() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model_view(model).layers[0].linears["mlp.down_proj"].weight.fill_(float("inf"))
    with pytest.raises(LLMPruneError, match="NaN or inf"):
        run_layerwise(model_view(model), Recorder(), calib(1), device=CPU)


def test_statistics_pass_stops_after_the_last_linear_saw_its_input() -> None:
    """Without kept outputs, the observe pass skips the rest of the forward (the down projection)."""
    model = tiny_model("llama")
    view = model_view(model)
    inputs = capture_layer_inputs(model, view.layer_list, list(calib(3).split(1)), device=CPU, cache_device=CPU)
    layer = view.layers[0]
    down = layer.linears["mlp.down_proj"]
    calls = []
    handle = down.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            full = LayerContext(layer, CPU, CPU, inputs.hidden, inputs.args[0], inputs.kwargs[0]).observe(
                hessian=True, keep_outputs=True)
            assert len(calls) == 3
            early = LayerContext(layer, CPU, CPU, inputs.hidden, inputs.args[0], inputs.kwargs[0]).observe(hessian=True)
    finally:
        handle.remove()
    assert len(calls) == 3  # the early pass never ran down_proj itself
    assert set(early) == set(full)
    for name in full:
        assert early[name].tokens == full[name].tokens == 3 * 32
        torch.testing.assert_close(early[name].hessian, full[name].hessian, rtol=0, atol=0)


def _input_of(ctx: LayerContext, linear: torch.nn.Module) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = linear.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        ctx.run_batch(0)
    finally:
        handle.remove()
    return seen[0]


def _true_sequential_by_hand(model: torch.nn.Module, ids: torch.Tensor, sparsity: float) -> None:
    """An independent, slow reference for sequential="linear" Wanda: for each linear in execution
    order, re-run the whole layer (earlier linears already pruned) to get its input, then prune it."""
    from llmprune.sparsity.scores import wanda
    from llmprune.sparsity.select import prune_mask

    view = model_view(model)
    with torch.no_grad():
        inputs = capture_layer_inputs(model, view.layer_list, [ids], device=CPU, cache_device=CPU)
        hidden = inputs.hidden
        for layer in view.layers:
            ctx = LayerContext(layer, CPU, CPU, hidden, inputs.args[layer.index], inputs.kwargs[layer.index])
            order: list[str] = []
            handles = [lin.register_forward_pre_hook(partial(lambda n, _m, _a, out: out.append(n), name, out=order))
                       for name, lin in layer.linears.items()]
            ctx.run_batch(0)
            for h in handles:
                h.remove()
            for name in order:
                lin = layer.linears[name]
                x = _input_of(ctx, lin)
                x = x.reshape(-1, x.shape[-1]).float()
                lin.weight.masked_fill_(prune_mask(wanda(lin.weight, x.pow(2).sum(0)), Pattern(sparsity)), 0.0)
            hidden = ctx.forward()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_linear_sequential_wanda_equals_a_by_hand_reference(family: str) -> None:
    from llmprune.methods import METHODS

    wanda = METHODS.get("wanda")
    ids = calib(4)
    reference, pruned = tiny_model(family), tiny_model(family)
    assert _same(reference, pruned)
    _true_sequential_by_hand(reference, ids, 0.5)
    method = wanda(Pattern(0.5), wanda.Options(sequential="linear"))
    reports = run_layerwise(model_view(pruned), method, ids, device=CPU, batch_size=1)  # batch_size is overridden
    assert _same(reference, pruned)
    assert all(abs(v - 0.5) < 1e-9 for r in reports for v in r["sparsity"].values())
    # Not the papers' protocol: later linears of a layer were calibrated on pruned inputs.
    layerwise = tiny_model(family)
    run_layerwise(model_view(layerwise), wanda(Pattern(0.5), wanda.Options()), ids, device=CPU)
    assert not _same(layerwise, pruned)
