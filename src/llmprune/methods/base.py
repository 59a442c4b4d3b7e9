"""What a pruning method is: options, what statistics it needs, and what it does to one layer."""

from __future__ import annotations

from abc import ABC
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from ..errors import LLMPruneError
from ..models.view import ModelView
from ..registry import Registry
from ..sparsity.bits import count_zeros, zero_where_
from ..sparsity.layerwise import check_owl_lambda, outlier_ratio, owl_sparsities
from ..sparsity.patterns import Pattern
from ..sparsity.reconstruct import reconstruct
from ..sparsity.scores import wanda
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


class AllocationOptions(MethodOptions):
    """Layer-wise sparsity allocation, an option of every unstructured method (sparsity/layerwise.py)."""

    allocation: Literal["uniform", "owl"] = Field(
        "uniform", description="layer-wise sparsity: uniform = every decoder layer at --sparsity; owl = OWL "
        "(Yin et al. 2024): layers with more outliers of the dense model's Wanda metric are pruned less, each within "
        "--sparsity +- 2 * owl_lambda, the parameter-weighted mean exactly --sparsity (unstructured patterns only; "
        "one extra calibration pass over the dense model)")
    owl_m: float = Field(5.0, gt=0, description="allocation=owl only: an outlier is a Wanda score above owl_m times "
                         "the layer's mean score (OWL's Hyper_m)")
    owl_lambda: float = Field(0.08, ge=0, description="allocation=owl only: the layers' sparsities span "
                              "--sparsity +- 2 * owl_lambda at most (OWL's Lamda)")


class ReconstructOptions(MethodOptions):
    """Re-solving the kept weights after the mask is chosen (sparsity/reconstruct.py)."""

    reconstruct: bool = Field(False, description="after the mask is chosen, re-solve the kept weights from the dense "
                              "ones for that mask and each linear's input Hessian X^T X (an llmprune extension; "
                              "needs calibration and X^T X of every linear)")
    reconstruct_solver: Literal["obs", "exact"] = Field(
        "obs", description="reconstruct only: obs = SparseGPT's column-by-column OBS updates; exact = one least-squares "
        "solve per output row for its kept weights (never a larger calibration error)")


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
        # allocation=owl: each layer's sparsity, set by the allocation pass (:class:`OutlierPass`) before
        # this method's own pass, and what the run report records of it (:meth:`allocation_report`).
        self.layer_sparsity: dict[int, float] | None = None
        self.outlier_ratios: dict[int, float] = {}
        self.layer_params: dict[int, int] = {}
        self._check_shared_options()
        if isinstance(options, ReconstructOptions) and options.reconstruct:
            self.stats = "hessian"  # type: ignore[misc]  # X^T X of every linear (its diagonal is Wanda's ||X_j||^2)
            self.needs_calibration = True  # type: ignore[misc]

    def _check_shared_options(self) -> None:
        """The allocation and reconstruct options, checked before any work."""
        opts = self.options
        fields = type(opts).model_fields
        if "reconstruct" in fields and "reconstruct_solver" in fields and not opts.reconstruct \
                and opts.reconstruct_solver != "obs":  # type: ignore[attr-defined]
            raise LLMPruneError(f"{self.name} option reconstruct_solver={opts.reconstruct_solver} chooses how "  # type: ignore[attr-defined]
                                f"reconstruct re-solves the kept weights, but reconstruct is off; add "
                                f"method.reconstruct=true")
        if not isinstance(opts, AllocationOptions):
            return
        if opts.allocation == "uniform":
            given = [f"method.{key}={getattr(opts, key):g}" for key in ("owl_m", "owl_lambda")
                     if getattr(opts, key) != fields[key].default]
            if given:
                raise LLMPruneError(f"{' and '.join(given)} set{'s' if len(given) == 1 else ''} OWL's layer-wise "
                                    f"allocation, but method.allocation is uniform; add method.allocation=owl (or "
                                    f"drop {' and '.join(g.split('=')[0] for g in given)})")
            return
        if self.pattern.is_nm:
            raise LLMPruneError(f"method.allocation={opts.allocation} gives each decoder layer its own sparsity, but "
                                f"the N:M pattern {self.pattern} fixes every layer's at {self.pattern.sparsity:g}; use "
                                f"an unstructured --sparsity, or method.allocation=uniform")
        check_owl_lambda(self.pattern.sparsity, opts.owl_lambda)

    @property
    def allocation(self) -> str:
        """``method.allocation`` (uniform for a method without the option)."""
        return getattr(self.options, "allocation", "uniform")

    @property
    def calibration_needed(self) -> bool:
        """Whether the run needs calibration data: for this method's own pass, or to allocate (OWL)."""
        return self.needs_calibration or self.allocation != "uniform"

    def allocation_pass(self) -> Method | None:
        """The pass the engine runs over the dense model before anything is pruned, whose ``finalize``
        sets :attr:`layer_sparsity` (``allocation=owl``); None: every layer at the pattern's sparsity."""
        return OutlierPass(self) if self.allocation == "owl" else None

    @contextmanager
    def at_layer(self, index: int) -> Iterator[None]:
        """While active, :attr:`pattern` is the pattern of layer ``index`` (its allocated sparsity); the
        engine enters it around each layer's prune step."""
        if self.layer_sparsity is None:
            yield
            return
        pattern = self.pattern
        self.pattern = replace(pattern, sparsity=self.layer_sparsity[index])
        try:
            yield
        finally:
            self.pattern = pattern

    def allocation_report(self) -> dict[str, Any] | None:
        """What the run report records of the layer-wise allocation (None: uniform)."""
        if self.layer_sparsity is None:
            return None
        opts: AllocationOptions = self.options  # type: ignore[assignment]
        return {"name": opts.allocation, "m": opts.owl_m, "lambda": opts.owl_lambda,
                "sparsity": self.pattern.sparsity,
                "layers": [{"layer": i, "outlier_ratio": self.outlier_ratios[i], "params": self.layer_params[i],
                            "sparsity": self.layer_sparsity[i]} for i in sorted(self.layer_sparsity)]}

    def allocate(self, ratios: dict[int, float], params: dict[int, int]) -> None:
        """Set every layer's sparsity from OWL's outlier ratios (:func:`owl_sparsities`)."""
        opts: AllocationOptions = self.options  # type: ignore[assignment]
        layers = sorted(ratios)
        sparsities = owl_sparsities([ratios[i] for i in layers], [params[i] for i in layers], self.pattern.sparsity,
                                    opts.owl_lambda)
        self.outlier_ratios, self.layer_params = dict(ratios), dict(params)
        self.layer_sparsity = dict(zip(layers, sparsities, strict=True))

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


class OutlierPass(Method):
    """``allocation=owl``: OWL's statistics pass over the dense model (dense propagation). Each layer's
    outlier ratio comes from the Wanda metric of all its prunable linears (no weight is changed);
    ``finalize`` gives ``owner`` its per-layer sparsities (:meth:`Method.allocate`)."""

    needs_calibration = True
    stats = "sq_norm"
    propagate = "dense"

    def __init__(self, owner: Method) -> None:
        super().__init__(owner.pattern, MethodOptions())
        self.owner = owner
        self.name = f"owl statistics ({owner.name})"  # type: ignore[misc]
        self.m = float(owner.options.owl_m)  # type: ignore[attr-defined]
        self.ratios: dict[int, float] = {}
        self.params: dict[int, int] = {}

    def prune_layer(self, ctx: LayerContext) -> dict[str, Any]:
        linears = ctx.layer.linears
        metrics = [lambda lin=lin, st=ctx.stats[name]: wanda(lin.weight, st.sq_norm) for name, lin in linears.items()]
        ratio = outlier_ratio(metrics, self.m)
        self.ratios[ctx.layer.index] = ratio
        self.params[ctx.layer.index] = sum(int(lin.weight.numel()) for lin in linears.values())
        return {"outlier_ratio": ratio}

    def finalize(self, view: ModelView) -> dict[str, Any]:
        self.owner.allocate(self.ratios, self.params)
        return {}


class MaskMethod(Method):
    """A method that chooses each linear's mask from a score (magnitude, Wanda) and leaves the kept
    weights at their dense values, or, with ``reconstruct``, re-solves them for that mask
    (:func:`llmprune.sparsity.reconstruct.reconstruct`; linears sharing an input as one stacked solve)."""

    def prune_mask_of(self, name: str, linear: nn.Linear, stats: InputStats | None) -> Tensor:
        """The prune mask (True = prune) of ``linear`` under :attr:`pattern`."""
        raise NotImplementedError

    @property
    def reconstructs(self) -> bool:
        return bool(getattr(self.options, "reconstruct", False))

    def prune_linear(self, name: str, linear: nn.Linear, stats: InputStats | None) -> float:
        mask = self.prune_mask_of(name, linear, stats)
        if not self.reconstructs:
            apply_prune_mask_(linear, mask)
            return zero_fraction(linear)
        assert stats is not None and stats.hessian is not None
        (solved,) = reconstruct([linear.weight], stats.hessian, [mask], self.options.reconstruct_solver)  # type: ignore[attr-defined]
        with torch.no_grad():
            linear.weight.copy_(solved.to(linear.weight.dtype))
        return zero_fraction(linear)

    def prune_layer(self, ctx: LayerContext) -> dict[str, Any]:
        if not self.reconstructs:
            return super().prune_layer(ctx)
        linears = ctx.layer.linears
        for names in ctx.shared_input_groups(linears):
            masks = [self.prune_mask_of(n, linears[n], ctx.stats[n]) for n in names]
            solved = reconstruct([linears[n].weight for n in names], ctx.stats[names[0]].hessian, masks,
                                 self.options.reconstruct_solver)  # type: ignore[attr-defined]
            with torch.no_grad():
                for n in names:  # one result released at a time
                    new = solved.pop(0)
                    linears[n].weight.copy_(new.to(linears[n].weight.dtype))
                    del new
        return {"sparsity": {name: zero_fraction(linear) for name, linear in linears.items()}}


METHODS: Registry[type[Method]] = Registry("method")


def apply_prune_mask_(linear: nn.Linear, prune_mask: Tensor) -> None:
    """Zero the weights where ``prune_mask`` is True, in place."""
    zero_where_(linear.weight, prune_mask)


def zero_fraction(linear: nn.Linear) -> float:
    return count_zeros(linear.weight) / linear.weight.numel()
