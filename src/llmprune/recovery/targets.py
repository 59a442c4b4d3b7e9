"""What LoRA attaches to, what it costs per rank, and block importance measured on the fly.

Targets are every decoder linear the model view finds (attention and MLP, all roles), named by
their full module path, so no family-specific name (``q_proj``...) appears here.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from ..engine.context import calibration_mode
from ..errors import LLMPruneError
from ..models.surgery import attn_group, mlp_group
from ..models.view import ModelView
from ..sparsity.allocation import block_importance
from ..sparsity.bits import count_zeros


def target_names(view: ModelView) -> list[list[str]]:
    """Per block, the full module names of its linears (what PEFT's ``target_modules`` lists)."""
    return [[f"{view.layers_path}.{layer.index}.{name}" for name in layer.linears] for layer in view.layers]


def block_costs(view: ModelView) -> list[int]:
    """Per block, the LoRA parameters one unit of rank costs: sum over its linears of in + out."""
    return [sum(lin.in_features + lin.out_features for lin in layer.linears.values()) for layer in view.layers]


def removed_shares(view: ModelView, structure: dict[str, Any] | None) -> list[float]:
    """Per block, the share of its dense decoder-linear weights that pruning removed: zero weights
    (unstructured and N:M pruning) plus, after structured pruning (``structure`` is the report's
    ``structure`` record), the weights of the removed MLP channels and KV groups. The dense size of a
    shrunk block follows from its present size, since every MLP weight scales with the channel count
    and every attention weight with the KV-group count."""
    mlp_dense = attention = None
    if structure is not None:
        mlp_dense = int((structure.get("mlp_channels") or {}).get("dense_width") or 0)
        attention = structure.get("attention")
        if mlp_dense < 1:
            raise LLMPruneError("the pruning report's structure record has no dense MLP width; it is not from "
                                "llmprune's structured pruning, so the removed share of each block is unknown")
    shares = []
    for i, layer in enumerate(view.layers):
        weights = [lin.weight for lin in layer.linears.values()]
        present = sum(w.numel() for w in weights)
        dense = float(present)
        if mlp_dense is not None:
            group = mlp_group(layer)
            dense += sum(lin.weight.numel() for lin in (*group.inputs.values(), group.output)) * (
                mlp_dense / group.width - 1)
        if attention is not None:
            att = attn_group(layer)
            dense += sum(att.linear(k).weight.numel() for k in "qkvo") * (
                attention["kv_heads_dense"][i] / att.kv_heads - 1)
        kept = present - sum(count_zeros(w) for w in weights)
        shares.append(max(0.0, 1.0 - kept / dense))
    return shares


def rank_patterns(names: list[list[str]], ranks: list[int], alpha_per_rank: float) -> tuple[dict[str, int], dict[str, float]]:
    """PEFT ``rank_pattern`` / ``alpha_pattern`` (module regex -> value): one rank per block, alpha = ratio * rank,
    so every block has the same scaling alpha / r and only its capacity differs."""
    ranks_by_name = {re.escape(n): r for block, r in zip(names, ranks, strict=True) for n in block}
    return ranks_by_name, {k: alpha_per_rank * r for k, r in ranks_by_name.items()}


def measure_importance(view: ModelView, windows: Tensor, device: torch.device, batch_size: int = 1) -> list[float]:
    """CFSP's coarse block importance of the model as it is: the angular distance between each decoder
    block's input and output hidden states, summed over the tokens of ``windows``, divided by the token
    count (a mean per token; allocation by proportional shares does not depend on the scale)."""
    sums = [0.0] * len(view.layers)
    pending: dict[int, Tensor] = {}
    handles = []

    def pre(index: int):  # type: ignore[no-untyped-def]
        def hook(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            pending[index] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def post(index: int):  # type: ignore[no-untyped-def]
        def hook(_mod: Any, _args: Any, _kwargs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            sums[index] += block_importance(pending.pop(index), out.detach(), "angular")
        return hook

    for i, layer in enumerate(view.layers):
        handles.append(layer.module.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.module.register_forward_hook(post(i), with_kwargs=True))
    try:
        with calibration_mode(view.model):
            for start in range(0, windows.shape[0], batch_size):
                view.model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    tokens = windows.numel()
    return [s / tokens for s in sums]
