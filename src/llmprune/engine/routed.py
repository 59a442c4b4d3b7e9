"""Calibration statistics of routed experts, from the model's real forward.

A forward pre-hook on each experts module receives exactly what the model's own router produced
(``hidden_states``, ``top_k_index``, ``top_k_weights``): the router is never re-implemented. For
each expert the hook takes the tokens whose top-k contains it (``calib.moe=routed``) or every token
(``calib.moe=all``, statistics only: the forward itself still routes as the model does) and
accumulates the input statistics of its gate/up projections (one shared object, like gate/up of a
dense MLP) and of its down projection (the expert's own intermediate activation).

Fallback: an expert that received no token in ``routed`` mode gets identity statistics
(:meth:`InputStats.as_identity_`), so Wanda and SparseGPT prune it by weight magnitude alone; the
layer's report lists such experts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import LLMPruneError
from ..models.moe import ExpertGroup, routed_inputs, routed_tokens
from .observers import InputStats

MoECalib = Literal["routed", "all"]
MOE_CALIB_MODES = ("routed", "all")
FALLBACK = "magnitude (identity statistics: ||X_j|| = 1, H = I)"


def check_moe_calib(mode: str) -> None:
    if mode not in MOE_CALIB_MODES:
        raise LLMPruneError(f"calib.moe={mode!r} is unknown; choose routed (each expert on the tokens the router "
                            f"sends it) or all (every token through every expert, for statistics only)")


class RoutedObserver:
    """Accumulates one expert group's per-expert statistics over the calibration batches."""

    def __init__(self, group: ExpertGroup, mode: str, stats: dict[str, InputStats], seen: set[str], *,
                 hessian: bool, moments: bool, device: torch.device,
                 prune_now: Callable[[str, Any, InputStats], None] | None = None) -> None:
        check_moe_calib(mode)
        self.group, self.mode, self.stats, self.seen = group, mode, stats, seen
        self.hessian, self.moments, self.device, self.prune_now = hessian, moments, device, prune_now
        self.tokens = torch.zeros(group.num_experts, dtype=torch.long)  # routed tokens per expert, all batches

    def _stats(self, name: str) -> InputStats:
        if name not in self.stats:
            linear = self.group.linears[name]
            self.stats[name] = InputStats(linear.in_features, hessian=self.hessian, device=self.device,
                                          moments=self.moments)
        return self.stats[name]

    def _expert(self, e: int, x: Tensor) -> None:
        *ins, down = self.group.names(e)
        up_stats = self._stats(ins[0])
        for name in ins[1:]:
            self.stats[name] = up_stats  # gate and up see the very same input
        down_stats = self._stats(down)
        if self.prune_now is not None and x.shape[0] == 0 and self.mode == "routed":
            up_stats.as_identity_()
            down_stats.as_identity_()
        if x.shape[0]:
            up_stats.update(x)
        if self.prune_now is not None:
            for name in ins:
                self.prune_now(name, self.group.linears[name], up_stats)
        if x.shape[0]:
            down_stats.update(self.group.intermediate(e, x))
        if self.prune_now is not None:
            self.prune_now(down, self.group.linears[down], down_stats)

    def hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x, index, _weights = routed_inputs(args, kwargs)
        for e in range(self.group.num_experts):
            token, _slot = routed_tokens(index, e)
            self.tokens[e] += token.numel()
            self._expert(e, x if self.mode == "all" else x[token])
        self.seen.update(self.group.linears)

    def finish(self) -> dict[str, Any]:
        """Apply the fallback to the experts that saw no token; the report of this group."""
        unrouted = [e for e in range(self.group.num_experts) if int(self.tokens[e]) == 0]
        if self.mode == "routed" and self.prune_now is None:
            for e in unrouted:
                for name in self.group.names(e):
                    self._stats(name).as_identity_()
        return {"tokens": self.tokens.tolist(), "unrouted": unrouted,
                **({"fallback": FALLBACK} if unrouted and self.mode == "routed" else {}), "calib": self.mode}


def moe_summary(layer_reports: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Run-level MoE section: how many experts were calibrated, and how many got the fallback."""
    groups = [g for r in layer_reports for g in (r.get("experts") or {}).values()]
    if not groups:
        return None
    return {"expert_groups": len(groups), "experts": sum(len(g["tokens"]) for g in groups),
            "unrouted_experts": (unrouted := sum(len(g["unrouted"]) for g in groups)),
            **({"fallback": FALLBACK} if unrouted and "removed" not in groups[0] else {}),
            **({"experts_removed": sum(len(g["removed"]) for g in groups),
                "experts_per_layer": sorted({g["kept"] for g in groups})} if "removed" in groups[0] else {}),
            "calib": groups[0]["calib"]}
