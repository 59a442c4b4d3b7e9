"""The layer-wise engine reproduces the model's own computation, per family, and leaves no trace."""

from __future__ import annotations

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
