"""Capture what the model really passes to each decoder layer.

The real forward runs on the calibration batch; each decoder layer's ``forward`` is temporarily
replaced by a recorder that stores its positional and keyword arguments and hands its input hidden
states through unchanged (so only the embeddings run, not the blocks). The last layer stops the
forward, so the head never runs. Recording per layer, rather than layer 0's arguments for all,
gets each attention type its own mask and rotary embeddings (Gemma 2/3 sliding windows) and covers
any per-layer argument a family adds. Identical tensors are stored once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LLMPruneError

_CACHE_KEYS = ("past_key_values", "past_key_value", "layer_past")


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Per calibration batch: the hidden states entering the current layer and each layer's other args."""

    hidden: list[Tensor]  # one (batch, seq, hidden) tensor per calibration batch
    args: list[list[tuple[Any, ...]]] = field(default_factory=list)  # [layer][batch] extra positional args
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)  # [layer][batch] keyword args


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=False))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, str, bool, type(None))) and a == b)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def move_to(value: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``."""
    return _to(value, device)


class _Recorder:
    def __init__(self, n_layers: int, cache_device: torch.device) -> None:
        self.n_layers = n_layers
        self.cache_device = cache_device
        self.hidden: Tensor | None = None
        self.args: list[tuple[Any, ...]] = [()] * n_layers
        self.kwargs: list[dict[str, Any]] = [{}] * n_layers

    def make_forward(self, index: int):  # type: ignore[no-untyped-def]
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            rest = args[1:]
            for key in _CACHE_KEYS:
                if kwargs.get(key) is not None:
                    # A cache object replayed for every sample would make samples attend to each other.
                    kwargs[key] = None
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            if index == 0:
                self.hidden = hidden.detach().to(self.cache_device)
            self.args[index] = _to(rest, self.cache_device)
            self.kwargs[index] = _to(kwargs, self.cache_device)
            if index == self.n_layers - 1:
                raise _StopForward
            return hidden

        return forward


def capture_layer_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    batches: list[Tensor],
    *,
    device: torch.device,
    cache_device: torch.device,
) -> LayerInputs:
    """Run the model's own forward on each batch of token ids and record every layer's inputs.

    Only the modules before the first layer (embeddings, rotary) need to be on ``device``.
    """
    recorder = _Recorder(len(layers), cache_device)
    inputs = LayerInputs(hidden=[], args=[[] for _ in layers], kwargs=[[] for _ in layers])
    for index, layer in enumerate(layers):
        layer.forward = recorder.make_forward(index)  # instance attribute shadows the class method
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise LLMPruneError("the model's forward did not call its last decoder layer; layout unsupported")
            assert recorder.hidden is not None
            inputs.hidden.append(recorder.hidden)
            for index in range(len(layers)):
                args, kwargs = recorder.args[index], recorder.kwargs[index]
                # Store identical arguments once (masks and rotary tables repeat across batches).
                if inputs.args[index] and _same(inputs.args[index][-1], args):
                    args = inputs.args[index][-1]
                if inputs.kwargs[index] and _same(inputs.kwargs[index][-1], kwargs):
                    kwargs = inputs.kwargs[index][-1]
                inputs.args[index].append(args)
                inputs.kwargs[index].append(kwargs)
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
    return inputs
