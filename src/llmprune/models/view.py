"""ModelView: the decoder layers of a causal LM, their attention types, and their linears by role.

Found by introspection, so a new family that follows the common layout needs no code here:

* decoder layers: the ``nn.ModuleList`` whose blocks are of a class named in the model's
  ``_no_split_modules`` (every transformers decoder declares it) and whose length is
  ``config.num_hidden_layers``; otherwise the longest list of identical blocks that hold linears;
* attention type: ``layer.attention_type`` or ``config.layer_types[i]`` (Gemma 2/3, Qwen with
  sliding windows), else ``"full_attention"``;
* linear roles: :mod:`llmprune.models.roles`;
* Mixture-of-Experts layers: each routed expert's projections become linears with MLP roles
  (:mod:`llmprune.models.moe`); routers are never presented. Dense and MoE layers may mix.

An unknown layout fails with an error that shows what was found.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import LLMPruneError
from ..sparsity.bits import all_finite
from .moe import ExpertGroup, ExpertLinear, find_expert_groups, is_routing_linear
from .roles import Role, role_of


@dataclass
class DecoderLayer:
    index: int
    module: nn.Module
    attention_type: str
    linears: dict[str, nn.Linear]  # dotted name inside the layer -> module, in module order
    roles: dict[str, Role]
    # Routed experts (MoE layers): their linears (ExpertLinear views into the fused 3-D parameters)
    # are in ``linears`` too, named ``<experts path>.<expert>.<gate_proj|up_proj|down_proj>``.
    experts: list[ExpertGroup] = field(default_factory=list)

    @property
    def is_moe(self) -> bool:
        return bool(self.experts)

    def dense_linears(self) -> dict[str, nn.Linear]:
        """The ``nn.Linear`` modules of the layer (everything but the routed experts' views)."""
        return {name: lin for name, lin in self.linears.items() if not isinstance(lin, ExpertLinear)}

    def by_role(self, role: Role) -> dict[str, nn.Linear]:
        return {name: lin for name, lin in self.linears.items() if self.roles[name] is role}

    def sub_block(self, kind: str) -> nn.Module | None:
        """The module that holds the attention ("attn") or MLP ("mlp") linears, if one module holds them all.

        None when the linears sit directly in the layer (OPT's fc1/fc2). For an MoE layer's MLP: the
        MoE block (router, experts and shared experts), if it is one module.
        """
        if kind == "mlp" and self.experts:
            blocks = {g.block_path for g in self.experts}
            return self.module.get_submodule(blocks.pop()) if len(blocks) == 1 and "" not in blocks else None
        roles = (Role.ATTN_IN, Role.ATTN_OUT) if kind == "attn" else (Role.MLP_IN, Role.MLP_OUT)
        names = [n for n, r in self.roles.items() if r in roles]
        parents = {n.rsplit(".", 1)[0] if "." in n else "" for n in names}
        if len(parents) != 1 or "" in parents:
            return None
        return self.module.get_submodule(parents.pop())


@dataclass
class ModelView:
    model: nn.Module
    layers_path: str
    layers: list[DecoderLayer] = field(default_factory=list)

    @property
    def layer_list(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)  # type: ignore[return-value]

    def linear_count(self) -> int:
        return sum(len(layer.linears) for layer in self.layers)

    def describe(self) -> dict[str, object]:
        """A JSON-friendly summary (what ``llmprune inspect`` shows)."""
        cfg = getattr(self.model, "config", None)
        first = self.layers[0]
        return {
            "model_type": getattr(cfg, "model_type", type(self.model).__name__),
            "class": type(self.model).__name__,
            "layers_path": self.layers_path,
            "num_layers": len(self.layers),
            "attention_types": [layer.attention_type for layer in self.layers],
            "roles": {name: role.value for name, role in first.roles.items()},
            "shapes": {name: list(lin.weight.shape) for name, lin in first.linears.items()},
            **({"moe": {"layers": [layer.index for layer in self.layers if layer.is_moe],
                        "experts": {g.path: {"num_experts": g.num_experts, "top_k": g.top_k, "router": g.router_path}
                                    for layer in self.layers for g in layer.experts}}}
               if any(layer.is_moe for layer in self.layers) else {}),
        }


def _find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    uniform = [
        (name, mod)
        for name, mod in lists
        if len({type(m) for m in mod}) == 1 and any(isinstance(x, nn.Linear) for x in mod[0].modules())
    ]
    preferred = [(n, m) for n, m in uniform if type(m[0]).__name__ in no_split and (n_layers is None or len(m) == n_layers)]
    chosen = preferred or sorted(uniform, key=lambda nm: len(nm[1]), reverse=True)
    if not chosen:
        found = ", ".join(f"{n} ({len(m)} x {type(m[0]).__name__})" for n, m in lists) or "none"
        raise LLMPruneError(
            f"could not find the decoder layers of {type(model).__name__}: no list of identical blocks with "
            f"linear layers (module lists found: {found})"
        )
    return chosen[0]


def _attention_type(layer: nn.Module, index: int, config: object) -> str:
    kind = getattr(layer, "attention_type", None)
    if isinstance(kind, str):
        return kind
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and index < len(layer_types):
        return str(layer_types[index])
    return "full_attention"


def model_view(model: nn.Module) -> ModelView:
    """Introspect ``model``; raise LLMPruneError with what was found if the layout is unknown."""
    path, layer_list = _find_layer_list(model)
    view = ModelView(model=model, layers_path=path)
    config = getattr(model, "config", None)
    for index, block in enumerate(layer_list):
        linears: dict[str, nn.Linear] = {}
        roles: dict[str, Role] = {}
        unknown: list[str] = []
        groups = find_expert_groups(block, config, f"{path}.{index}")
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear) and not is_routing_linear(name, groups):
                role = role_of(name)
                if role is None:
                    unknown.append(name)
                else:
                    linears[name], roles[name] = mod, role
        for group in groups:
            for name, expert_linear in group.linears.items():
                linears[name] = expert_linear  # type: ignore[assignment]  (nn.Linear-like: weight, in/out_features)
                roles[name] = role_of(name)  # type: ignore[assignment]  (gate_proj/up_proj/down_proj)
        if unknown or not linears:
            raise LLMPruneError(
                f"unknown layout in {path}.{index} ({type(block).__name__}): linear layers "
                f"{unknown or 'none'} have no known role; classified: {roles or 'none'}. "
                f"Add the names to llmprune/models/roles.py"
            )
        missing = {Role.ATTN_IN, Role.ATTN_OUT, Role.MLP_IN, Role.MLP_OUT} - set(roles.values())
        if missing:
            raise LLMPruneError(
                f"layer {path}.{index} ({type(block).__name__}) lacks linears for roles "
                f"{sorted(r.value for r in missing)}; found {dict((n, r.value) for n, r in roles.items())}"
            )
        view.layers.append(DecoderLayer(index, block, _attention_type(block, index, config), linears, roles, groups))
    return view


def check_not_tied(view: ModelView) -> None:
    """Refuse to prune a decoder linear whose weight is shared with a module outside the layers."""
    inside = {id(lin.weight) for layer in view.layers for lin in layer.linears.values()}
    for name, param in view.model.named_parameters(remove_duplicate=False):
        if id(param) in inside and not name.startswith(view.layers_path + "."):
            raise LLMPruneError(
                f"the decoder linear weight is tied to {name}, which lies outside the decoder layers; "
                f"pruning it would also prune that module. Untie the weights first"
            )


def check_finite_weights(view: ModelView) -> None:
    for layer in view.layers:
        for name, lin in layer.linears.items():
            if not all_finite(lin.weight):
                raise LLMPruneError(
                    f"layer {layer.index} {name} has NaN or inf weights; the checkpoint is corrupt or was "
                    f"loaded in a dtype too small for it (try --set model.dtype=float32)"
                )
