"""Physical removal of MLP channels, and the record that lets a pruned checkpoint reload.

An MLP channel j is one intermediate unit: row j of every MLP input linear (gate and up, or fc1;
rows j and I + j of a fused gate_up) and column j of the MLP output linear (down, fc2). The
linears are found by role (:mod:`llmprune.models.roles`), so no family is named here.

Stock transformers builds every layer with the config's global width, so a model whose layers
have different widths cannot be rebuilt by ``from_pretrained``. The widths are recorded in the
saved config under :data:`STRUCTURE_KEY`; :func:`llmprune.models.loading.load_model` rebuilds each
layer to its width before loading the tensors. When every layer has the same width and no bias
was added, the config's own width field is set instead and the checkpoint is a stock one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LLMPruneError
from .roles import Role
from .view import DecoderLayer, ModelView

STRUCTURE_KEY = "llmprune_structure"
# Config fields that hold the MLP width, most specific first.
WIDTH_FIELDS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")


@dataclass
class MlpGroup:
    """The MLP linears of one decoder layer, seen as ``width`` removable channels."""

    layer: DecoderLayer
    inputs: dict[str, nn.Linear]  # gate/up or fc1 (rows are channels)
    fused: dict[str, int]  # input linear name -> how many channel blocks it stacks (2 for gate_up)
    output_name: str
    output: nn.Linear  # down or fc2 (columns are channels)

    @property
    def width(self) -> int:
        return self.output.in_features

    def input_rows(self, name: str) -> Tensor:
        """(width, parts, hidden) view of an input linear's weight: one slice per stacked block."""
        w = self.inputs[name].weight
        parts = self.fused[name]
        return w.reshape(parts, self.width, w.shape[1]).transpose(0, 1)

    def channel_params(self) -> int:
        """Parameters that one channel of this layer holds (weights and biases)."""
        n = self.output.out_features
        for name, lin in self.inputs.items():
            n += self.fused[name] * (lin.in_features + (1 if lin.bias is not None else 0))
        return n

    def params(self) -> int:
        return sum(p.numel() for lin in [*self.inputs.values(), self.output] for p in lin.parameters())


def mlp_group(layer: DecoderLayer) -> MlpGroup:
    """The removable-channel view of ``layer``'s MLP; raise if the shapes do not allow it."""
    outs = layer.by_role(Role.MLP_OUT)
    ins = layer.by_role(Role.MLP_IN)
    if len(outs) != 1 or not ins:
        raise LLMPruneError(
            f"layer {layer.index}: channel pruning needs one MLP output linear and at least one input linear; "
            f"found outputs {sorted(outs)} and inputs {sorted(ins)}"
        )
    (out_name, out), = outs.items()
    width = out.in_features
    fused = {}
    for name, lin in ins.items():
        if lin.out_features % width or lin.in_features != out.out_features:
            raise LLMPruneError(
                f"layer {layer.index}: MLP input {name} has shape {tuple(lin.weight.shape)}, which does not "
                f"stack whole channels of the MLP width {width} (output {out_name}: {tuple(out.weight.shape)})"
            )
        fused[name] = lin.out_features // width
    return MlpGroup(layer, dict(ins), fused, out_name, out)


def _new_linear(old: nn.Linear, weight: Tensor, bias: Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(old.training)
    return new


def _replace(layer: DecoderLayer, name: str, new: nn.Linear) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = layer.module.get_submodule(parent_name) if parent_name else layer.module
    setattr(parent, leaf, new)
    layer.linears[name] = new


def shrink_mlp(layer: DecoderLayer, keep: Tensor, out_bias_delta: Tensor | None = None) -> None:
    """Keep only channels ``keep`` (sorted indices) of ``layer``'s MLP; the others are removed.

    ``out_bias_delta`` (out_features,) is added to the output linear's bias, which is created if
    the linear had none (FLAP's bias compensation).
    """
    group = mlp_group(layer)
    keep = keep.to(torch.long).sort().values.to(group.output.weight.device)
    if keep.numel() == 0:
        raise LLMPruneError(f"layer {layer.index}: removing every MLP channel would leave an empty block")
    with torch.no_grad():
        for name, lin in group.inputs.items():
            parts = group.fused[name]
            rows = torch.cat([keep + p * group.width for p in range(parts)])
            bias = lin.bias[rows] if lin.bias is not None else None
            _replace(layer, name, _new_linear(lin, lin.weight[rows], bias))
        out = group.output
        bias = out.bias.clone() if out.bias is not None else None
        if out_bias_delta is not None:
            delta = out_bias_delta.to(device=out.weight.device, dtype=out.weight.dtype)
            bias = delta if bias is None else bias + delta
        _replace(layer, group.output_name, _new_linear(out, out.weight[:, keep], bias))


def resize_mlp_empty(layer: DecoderLayer, width: int, out_bias: bool) -> None:
    """Give ``layer``'s MLP linears the shapes of a ``width``-channel MLP (values to be loaded)."""
    group = mlp_group(layer)
    for name, lin in group.inputs.items():
        new = nn.Linear(lin.in_features, group.fused[name] * width, bias=lin.bias is not None,
                        device=lin.weight.device, dtype=lin.weight.dtype)
        _replace(layer, name, new)
    out = group.output
    _replace(layer, group.output_name, nn.Linear(width, out.out_features, bias=out_bias or out.bias is not None,
                                                 device=out.weight.device, dtype=out.weight.dtype))


def width_field(config: Any, width: int) -> str:
    """The config field that holds the (original) MLP width."""
    for name in WIDTH_FIELDS:
        if getattr(config, name, None) == width:
            return name
    found = {n: getattr(config, n) for n in WIDTH_FIELDS if hasattr(config, n)}
    raise LLMPruneError(f"cannot find the MLP width {width} in the model config (looked at {found or list(WIDTH_FIELDS)})")


def record_structure(view: ModelView, dense_width: int, out_bias_added: bool) -> dict[str, Any]:
    """Write the per-layer widths into the model config (what a saved checkpoint reloads from).

    Uniform widths without an added bias become a stock config (width field set, nothing recorded).
    """
    config = view.model.config
    widths = [mlp_group(layer).width for layer in view.layers]
    existing = getattr(config, STRUCTURE_KEY, None) or {}
    field = existing.get("width_field") or width_field(config, dense_width)
    out_bias_added = out_bias_added or bool(existing.get("mlp_out_bias", False))
    if len(set(widths)) == 1 and not out_bias_added:
        setattr(config, field, widths[0])
        if hasattr(config, STRUCTURE_KEY):
            delattr(config, STRUCTURE_KEY)
        return {"mlp_widths": widths, "stock_checkpoint": True}
    record = {"width_field": field, "mlp_widths": widths, "mlp_out_bias": out_bias_added}
    setattr(config, STRUCTURE_KEY, record)
    return {**record, "stock_checkpoint": False}
