"""Mixture-of-Experts layers: expert groups found by introspection, each expert's matrices as linears.

In transformers 5 the routed experts of a layer are one module holding fused 3-D parameters
(``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]; gpt-oss stores them transposed, with
``gate`` and ``up`` interleaved, and with biases). The class is decorated with
``use_experts_implementation``, which records that layout on the instance (``has_gate``,
``has_bias``, ``is_transposed``, ``is_concatenated``); every experts implementation of transformers
(eager, batched, grouped) computes from exactly those attributes, and so does this module.

Each expert's projections are presented to the methods as :class:`ExpertLinear` objects: a 2-D
``weight`` in ``nn.Linear``'s [out, in] orientation that is a *view* into the fused parameter, so
pruning it in place writes the fused tensor. Method code therefore never knows about experts.

Routers (``gate``/``router`` modules, the shared-expert gate of Qwen2-MoE) are never pruned:
they are not presented as linears. Shared experts are ordinary ``nn.Linear`` MLPs and keep their
usual roles. A module with 3-D expert-shaped parameters that lacks the experts interface is
refused with what was found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LLMPruneError

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "moe_k")
ROUTING_LEAVES = ("gate", "router", "shared_expert_gate", "wg")  # leaf names of routing linears, never pruned
_LAYOUT_ATTRS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


def config_expert_counts(config: Any) -> set[int]:
    """The expert counts a config declares (under any of the names families use)."""
    counts = set()
    for cfg in (config, getattr(config, "text_config", None)):
        for key in EXPERT_COUNT_KEYS:
            value = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                counts.add(value)
    return counts


class ExpertLinear:
    """One projection of one expert, as an ``nn.Linear``-like object ([out, in] weight view, bias view).

    ``part`` is "gate" or "up" for the two halves of a fused gate_up projection (concatenated
    [gate; up] or interleaved gate0, up0, gate1, ...), None for a whole matrix (down, or up without gate).
    """

    def __init__(self, group: ExpertGroup, param_name: str, expert: int, part: str | None) -> None:
        self.group = group
        self.param_name = param_name
        self.expert = expert
        self.part = part

    def _rows(self, t: Tensor) -> Tensor:
        if self.part is None:
            return t
        if self.group.concatenated:
            half = t.shape[0] // 2
            return t[:half] if self.part == "gate" else t[half:]
        return t[0::2] if self.part == "gate" else t[1::2]

    @property
    def weight(self) -> Tensor:
        w = getattr(self.group.module, self.param_name)[self.expert]
        return self._rows(w.t() if self.group.transposed else w)

    @property
    def bias(self) -> Tensor | None:
        if not self.group.has_bias:
            return None
        return self._rows(getattr(self.group.module, f"{self.param_name}_bias")[self.expert])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def __repr__(self) -> str:
        part = f", {self.part}" if self.part else ""
        return f"ExpertLinear({self.group.path}.{self.param_name}[{self.expert}]{part}, {tuple(self.weight.shape)})"


@dataclass
class ExpertGroup:
    """The routed experts of one MoE block, with its router."""

    path: str  # the experts module, dotted inside the decoder layer
    module: nn.Module
    block_path: str  # the MoE block holding experts and router ("" when it is the layer)
    block: nn.Module
    router_path: str | None
    router: nn.Module | None
    num_experts: int
    top_k: int | None
    has_gate: bool
    has_bias: bool
    transposed: bool
    concatenated: bool
    linears: dict[str, ExpertLinear] = field(default_factory=dict)  # layer-relative name -> adapter

    @property
    def up_name(self) -> str:
        return "gate_up_proj" if self.has_gate else "up_proj"

    def names(self, expert: int) -> list[str]:
        """The linear names of ``expert`` in forward order (gate, up, down or up, down)."""
        leaves = ["gate_proj", "up_proj", "down_proj"] if self.has_gate else ["up_proj", "down_proj"]
        return [f"{self.path}.{expert}.{leaf}" for leaf in leaves]

    def build_linears(self) -> dict[str, ExpertLinear]:
        """(Re)create the per-expert views, numbered 0..num_experts-1 (after experts were removed too)."""
        parts: list[tuple[str, str | None]] = [(self.up_name, "gate"), (self.up_name, "up")] if self.has_gate else [
            (self.up_name, None)]
        parts.append(("down_proj", None))
        self.linears = {name: ExpertLinear(self, param, e, part) for e in range(self.num_experts)
                        for name, (param, part) in zip(self.names(e), parts, strict=True)}
        return self.linears

    def _fused(self, param: str, expert: int) -> tuple[Tensor, Tensor | None]:
        w = getattr(self.module, param)[expert]
        b = getattr(self.module, f"{param}_bias")[expert] if self.has_bias else None
        return (w.t() if self.transposed else w), b

    def intermediate(self, expert: int, x: Tensor) -> Tensor:
        """The down projection's input for tokens ``x`` (tokens, hidden) of ``expert``, computed as every
        transformers experts implementation does (the module's own ``_apply_gate`` / ``act_fn``)."""
        w, b = self._fused(self.up_name, expert)
        out = nn.functional.linear(x.to(w.dtype), w, b)
        return self.module._apply_gate(out) if self.has_gate else self.module.act_fn(out)

    def expert_output(self, expert: int, x: Tensor) -> Tensor:
        """The expert's output for tokens ``x`` (before the router weight)."""
        w, b = self._fused("down_proj", expert)
        return nn.functional.linear(self.intermediate(expert, x), w, b)


def _experts_shaped(module: nn.Module, counts: set[int]) -> dict[str, tuple[int, ...]]:
    """The module's own 3-D parameters whose leading dimension is an expert count."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return {}
    own = getattr(module, "num_experts", None)
    lead = counts | ({own} if isinstance(own, int) else set())
    return {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.shape[0] in lead}


def _find_router(block: nn.Module, experts_name: str, num_experts: int, hidden: int) -> tuple[str | None, nn.Module | None]:
    for name, child in block.named_children():
        if name == experts_name:
            continue
        weight = getattr(child, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[0] == num_experts and (
                weight.shape[1] == hidden):
            return name, child
    return None, None


def _top_k(*sources: Any) -> int | None:
    for src in sources:
        for key in TOP_K_KEYS:
            value = getattr(src, key, None) if src is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def find_expert_groups(layer: nn.Module, config: Any, where: str) -> list[ExpertGroup]:
    """The routed expert groups of one decoder layer (empty for a dense layer)."""
    counts = config_expert_counts(config)
    groups: list[ExpertGroup] = []
    for path, module in layer.named_modules():
        shaped = _experts_shaped(module, counts)
        if not shaped:
            continue
        layout = {a: getattr(module, a, None) for a in _LAYOUT_ATTRS}
        has_gate = layout["has_gate"]
        up = "gate_up_proj" if has_gate else "up_proj"
        ok = all(isinstance(v, bool) for v in layout.values()) and {up, "down_proj"} <= set(shaped) and (
            not layout["has_bias"] or all(hasattr(module, f"{p}_bias") for p in (up, "down_proj")))
        if not ok or getattr(module, "has_post_expert_norm", False):
            raise LLMPruneError(
                f"{where}.{path} ({type(module).__name__}) holds expert-shaped 3-D parameters {shaped} but not "
                f"the transformers experts interface (use_experts_implementation: has_gate/has_bias/is_transposed/"
                f"is_concatenated, {up} and down_proj, no post-expert norm; found {layout}); this MoE layout "
                f"is not supported"
            )
        num_experts = shaped["down_proj"][0]
        block_path, _, leaf = path.rpartition(".")
        block = layer.get_submodule(block_path) if block_path else layer
        hidden = shaped[up][1] if layout["is_transposed"] else shaped[up][2]
        router_name, router = _find_router(block, leaf, num_experts, hidden)
        group = ExpertGroup(path, module, block_path, block,
                            f"{block_path}.{router_name}".lstrip(".") if router_name else None, router, num_experts,
                            _top_k(router, block, module, config, getattr(config, "text_config", None)),
                            bool(has_gate), bool(layout["has_bias"]), bool(layout["is_transposed"]),
                            bool(layout["is_concatenated"]))
        group.build_linears()
        groups.append(group)
    return groups


def is_routing_linear(name: str, groups: list[ExpertGroup]) -> bool:
    """Whether the ``nn.Linear`` ``name`` (inside the layer) is a router or a shared-expert gate of an
    MoE block: never pruned, never presented to the methods."""
    leaf = name.rsplit(".", 1)[-1]
    return any((g.block_path == "" or name.startswith(g.block_path + ".")) for g in groups) and leaf in ROUTING_LEAVES


def routed_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden_states, top_k_index, top_k_weights) as the experts module's forward received them
    (the experts interface's signature: positional, or by any of the names families use)."""
    values = list(args)
    for key in ("hidden_states", "top_k_index", "router_indices", "selected_experts", "top_k_weights",
                "routing_weights", "router_scores"):
        if key in kwargs:
            values.append(kwargs[key])
    if len(values) < 3:
        raise LLMPruneError(f"the experts module was called with {len(args)} positional arguments and keywords "
                            f"{sorted(kwargs)}; expected (hidden_states, top_k_index, top_k_weights)")
    x, index, weights = values[0], values[1], values[2]
    x = x.reshape(-1, x.shape[-1])
    return x, index.reshape(x.shape[0], -1), weights.reshape(x.shape[0], -1)


def routed_tokens(index: Tensor, expert: int) -> tuple[Tensor, Tensor]:
    """(token rows, top-k slot) of the tokens the router sent to ``expert``."""
    token, slot = torch.where(index == expert)
    return token, slot


def shared_expert_names(layer: Any) -> list[str]:
    """The ``nn.Linear`` names of a decoder layer that sit in an MoE block beside the routed experts
    (shared experts of Qwen2-MoE, DeepSeek, GLM; routers are not linears of the view)."""
    return [name for name, lin in layer.linears.items() if isinstance(lin, nn.Module) and any(
        g.block_path and name.startswith(g.block_path + ".") for g in layer.experts)]


def select_targets(view: Any, targets: str) -> None:
    """Keep in ``view`` only the linears ``moe.targets`` names (all, experts, shared, dense); refuse a
    request the model cannot satisfy, before any work."""
    if targets == "all":
        return
    moe_layers = [layer for layer in view.layers if layer.experts]
    if not moe_layers:
        raise LLMPruneError(f"moe.targets={targets} asks for Mixture-of-Experts parts, but "
                            f"{type(view.model).__name__} has no MoE layer")
    if targets == "shared" and not any(shared_expert_names(layer) for layer in moe_layers):
        raise LLMPruneError(f"moe.targets=shared, but {type(view.model).__name__} has no shared experts (its MoE "
                            f"blocks hold only routed experts and a router); use moe.targets=experts or all")
    for layer in view.layers:
        routed = {n for n, lin in layer.linears.items() if isinstance(lin, ExpertLinear)}
        shared = set(shared_expert_names(layer))
        keep = {"experts": routed, "shared": shared, "dense": set(layer.linears) - routed}[targets]
        for name in list(layer.linears):
            if name not in keep:
                del layer.linears[name]
                del layer.roles[name]
