"""What a pruning method is: options, what statistics it needs, and what it does to one layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from ..models.view import ModelView
from ..registry import Registry
from ..sparsity.patterns import Pattern

if TYPE_CHECKING:
    from ..engine.engine import LayerContext


class MethodOptions(BaseModel):
    """Options of a method; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Method(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    needs_calibration: ClassVar[bool] = True
    stats: ClassVar[Literal["sq_norm", "hessian"] | None] = "sq_norm"
    # What the next layer is calibrated on (see engine.run_layerwise).
    propagate: ClassVar[Literal["pruned", "dense"]] = "pruned"
    # Structured methods change shapes; their reports carry a "structure" section.
    structured: ClassVar[bool] = False

    def __init__(self, pattern: Pattern, options: MethodOptions) -> None:
        self.pattern = pattern
        self.options = options

    def validate(self, view: ModelView) -> None:
        """Check the model against the pattern before any work is done."""
        for layer in view.layers:
            for name, linear in layer.linears.items():
                self.pattern.check_width(linear.in_features, f"layer {layer.index} {name}")

    @abstractmethod
    def prune_layer(self, ctx: LayerContext) -> dict[str, Any]:
        """Prune the linears of ``ctx.layer`` in place and return a JSON-friendly report."""

    def share_statistics(self, other: Method) -> bool:
        """Take over the calibration statistics of ``other`` (a method that ran on the same model
        and calibration data) instead of running the engine; False when this method cannot."""
        return False

    def finalize(self, view: ModelView) -> dict[str, Any]:
        """Global step after every layer was seen (allocation, channel removal); returns a report."""
        return {}


METHODS: Registry[type[Method]] = Registry("method")


def apply_prune_mask_(linear: nn.Linear, prune_mask: Tensor) -> None:
    """Zero the weights where ``prune_mask`` is True, in place."""
    with torch.no_grad():
        linear.weight.masked_fill_(prune_mask.to(linear.weight.device), 0.0)


def zero_fraction(linear: nn.Linear) -> float:
    return float((linear.weight == 0).sum().item()) / linear.weight.numel()
