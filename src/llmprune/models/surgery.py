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

import inspect
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


@dataclass
class AttnGroup:
    """The attention of one decoder layer, seen as removable KV groups (a KV head with its query heads)."""

    layer: DecoderLayer
    names: dict[str, str]  # "q" | "k" | "v" | "o" -> linear name inside the layer
    head_dim: int
    q_per_kv: int

    def linear(self, key: str) -> nn.Linear:
        return self.layer.linears[self.names[key]]

    @property
    def kv_heads(self) -> int:
        return self.linear("k").out_features // self.head_dim

    def query_columns(self, groups: Tensor) -> Tensor:
        """Indices of the o_proj input columns (= q_proj rows) that belong to KV groups ``groups``."""
        heads = (groups.unsqueeze(1) * self.q_per_kv + torch.arange(self.q_per_kv, device=groups.device)).reshape(-1)
        return (heads.unsqueeze(1) * self.head_dim + torch.arange(self.head_dim, device=groups.device)).reshape(-1)

    def kv_rows(self, groups: Tensor) -> Tensor:
        return (groups.unsqueeze(1) * self.head_dim + torch.arange(self.head_dim, device=groups.device)).reshape(-1)


_ATTN_LEAVES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}


def attn_group(layer: DecoderLayer) -> AttnGroup:
    """The KV-group view of ``layer``'s attention; raise if heads cannot be removed safely.

    Heads are removable where the attention has separate q/k/v/o projections, stores ``head_dim``
    and ``num_key_value_groups``, and reshapes by ``(-1, self.head_dim)`` (the transformers 5
    convention), so the head count follows the tensors. Fused projections (Phi-3's qkv_proj) or a
    head count kept as a module attribute (OPT's ``num_heads``) are refused.
    """
    module = layer.sub_block("attn")
    names: dict[str, str] = {}
    for name in layer.linears:
        key = _ATTN_LEAVES.get(name.rsplit(".", 1)[-1])
        if key is not None:
            names[key] = name
    try:
        source = inspect.getsource(type(module).forward) if module is not None else ""
    except (OSError, TypeError):
        source = ""
    head_dim = getattr(module, "head_dim", None)
    q_per_kv = getattr(module, "num_key_value_groups", None)
    if (module is None or set(names) != {"q", "k", "v", "o"} or not isinstance(head_dim, int)
            or not isinstance(q_per_kv, int) or "-1, self.head_dim" not in source):
        kind = type(module).__name__ if module is not None else "no attention module"
        raise LLMPruneError(
            f"attention heads of {kind} (layer {layer.index}) cannot be removed safely: llmprune removes whole "
            f"KV groups only where the attention has separate q/k/v/o projections and reshapes by (-1, head_dim) "
            f"(LLaMA, Mistral, Qwen2/3, Gemma 2/3); found linears {sorted(layer.by_role(Role.ATTN_IN))}. "
            f"Prune MLP channels only (method.attention=0)"
        )
    group = AttnGroup(layer, names, head_dim, q_per_kv)
    if group.linear("q").out_features != group.kv_heads * q_per_kv * head_dim:
        raise LLMPruneError(f"layer {layer.index}: q_proj has {group.linear('q').out_features} outputs, not "
                            f"{group.kv_heads} KV heads x {q_per_kv} x head_dim {head_dim}")
    return group


def shrink_attention(layer: DecoderLayer, keep: Tensor) -> None:
    """Keep only KV groups ``keep`` (a KV head and its query heads) of ``layer``'s attention."""
    group = attn_group(layer)
    keep = keep.to(torch.long).sort().values
    if keep.numel() == 0:
        raise LLMPruneError(f"layer {layer.index}: removing every KV group would leave an empty attention")
    q_rows, kv_rows = group.query_columns(keep), group.kv_rows(keep)
    with torch.no_grad():
        for key, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            lin = group.linear(key)
            rows = rows.to(lin.weight.device)
            _replace(layer, group.names[key], _new_linear(lin, lin.weight[rows], lin.bias[rows] if lin.bias is not None else None))
        o = group.linear("o")
        _replace(layer, group.names["o"], _new_linear(o, o.weight[:, q_rows.to(o.weight.device)],
                                                      o.bias.clone() if o.bias is not None else None))


def resize_attention_empty(layer: DecoderLayer, kv_heads: int) -> None:
    """Give ``layer``'s attention the shapes of ``kv_heads`` KV groups (values to be loaded)."""
    group = attn_group(layer)
    q_out = kv_heads * group.q_per_kv * group.head_dim
    for key, out in (("q", q_out), ("k", kv_heads * group.head_dim), ("v", kv_heads * group.head_dim)):
        lin = group.linear(key)
        _replace(layer, group.names[key], nn.Linear(lin.in_features, out, bias=lin.bias is not None,
                                                    device=lin.weight.device, dtype=lin.weight.dtype))
    o = group.linear("o")
    _replace(layer, group.names["o"], nn.Linear(q_out, o.out_features, bias=o.bias is not None,
                                                device=o.weight.device, dtype=o.weight.dtype))


def width_field(config: Any, width: int) -> str:
    """The config field that holds the (original) MLP width."""
    for name in WIDTH_FIELDS:
        if getattr(config, name, None) == width:
            return name
    found = {n: getattr(config, n) for n in WIDTH_FIELDS if hasattr(config, n)}
    raise LLMPruneError(f"cannot find the MLP width {width} in the model config (looked at {found or list(WIDTH_FIELDS)})")


def record_structure(view: ModelView, dense_width: int, out_bias_added: bool, attention_pruned: bool = False) -> dict[str, Any]:
    """Write the per-layer widths into the model config (what a saved checkpoint reloads from).

    Uniform widths without an added bias become a stock config (width fields set, nothing recorded).
    """
    config = view.model.config
    widths = [mlp_group(layer).width for layer in view.layers]
    existing = getattr(config, STRUCTURE_KEY, None) or {}
    field = existing.get("width_field") or width_field(config, dense_width)
    out_bias_added = out_bias_added or bool(existing.get("mlp_out_bias", False))
    kv_heads = [attn_group(layer).kv_heads for layer in view.layers] if (
        attention_pruned or "attn_kv_heads" in existing) else None
    if len(set(widths)) == 1 and not out_bias_added and (kv_heads is None or len(set(kv_heads)) == 1):
        setattr(config, field, widths[0])
        if kv_heads is not None:
            group = attn_group(view.layers[0])
            config.head_dim = group.head_dim  # stays what it was, now explicit
            config.num_key_value_heads = kv_heads[0]
            config.num_attention_heads = kv_heads[0] * group.q_per_kv
        if hasattr(config, STRUCTURE_KEY):
            delattr(config, STRUCTURE_KEY)
        return {"mlp_widths": widths, **({"attn_kv_heads": kv_heads} if kv_heads else {}), "stock_checkpoint": True}
    record: dict[str, Any] = {"width_field": field, "mlp_widths": widths, "mlp_out_bias": out_bias_added}
    if kv_heads is not None:
        record["attn_kv_heads"] = kv_heads
    setattr(config, STRUCTURE_KEY, record)
    return {**record, "stock_checkpoint": False}
