"""What a pruning method is: options, what statistics it needs, and what it does to one layer."""

from __future__ import annotations

from abc import ABC
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from ..models.view import ModelView
from ..registry import Registry
from ..sparsity.bits import count_zeros, zero_where_
from ..sparsity.patterns import Pattern
from . import faithful

if TYPE_CHECKING:
    from ..engine.engine import LayerContext
    from ..engine.observers import InputStats


class MethodOptions(BaseModel):
    """Options of a method; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ``method.faithful=true``: the method's name and the option values that reproduce its released
    #: code (methods/faithful.py); None for a method without a faithful form (and no ``faithful`` field).
    faithful_form: ClassVar[tuple[str, dict[str, Any]] | None] = None

    @model_validator(mode="before")
    @classmethod
    def _faithful(cls, data: Any) -> Any:
        if cls.faithful_form is None:
            return data
        method, fixed = cls.faithful_form
        return faithful.apply(data, method, fixed)


class SequentialOptions(MethodOptions):
    """Options of the methods that prune each linear on its own from its input statistics."""

    sequential: Literal["layer", "linear"] = Field(
        "layer",
        description="layer = every linear of a decoder layer is calibrated on the dense layer's activations "
        "(the papers' protocol: two forwards per layer); linear = each linear is pruned as soon as its input "
        "was seen, so later linears of the layer see the already pruned ones ('true sequential'), in one "
        "forward per layer with all calibration windows in one batch",
    )


class Method(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    needs_calibration: ClassVar[bool] = True
    # What the engine observes of each linear's input: its per-column sum of squares, that plus the
    # per-column moments (mean, variance), X^T X, or nothing.
    stats: ClassVar[Literal["sq_norm", "moments", "hessian"] | None] = "sq_norm"
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

    @property
    def sequential(self) -> Literal["layer", "linear"]:
        """How the engine calibrates the linears of one layer (see :class:`SequentialOptions`)."""
        return getattr(self.options, "sequential", "layer")

    def prune_layer(self, ctx: LayerContext) -> dict[str, Any]:
        """Prune the linears of ``ctx.layer`` in place and return a JSON-friendly report.

        The default prunes each linear on its own with :meth:`prune_linear`; methods that look at
        a layer as a whole (structured, Barber) override this instead.
        """
        return {"sparsity": {name: self.prune_linear(name, linear, ctx.stats.get(name))
                             for name, linear in ctx.layer.linears.items()}}

    def prune_linear(self, name: str, linear: nn.Linear, stats: InputStats | None) -> float:
        """Prune one linear in place from its input statistics; return its fraction of zeros."""
        raise NotImplementedError(f"method {self.name} prunes whole layers (prune_layer), not single linears")

    def initial_pass(self) -> Method | None:
        """A method the engine runs over every layer before this one (LLM-Barber's initializer with
        ``order="reference"``); None: none."""
        return None

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
    zero_where_(linear.weight, prune_mask)


def zero_fraction(linear: nn.Linear) -> float:
    return count_zeros(linear.weight) / linear.weight.numel()
