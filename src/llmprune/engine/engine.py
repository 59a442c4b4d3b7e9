"""The only layer-by-layer loop: capture -> observe -> prune -> propagate.

Methods never loop over layers, register hooks or move tensors between devices; they receive a
:class:`LayerContext` for one decoder layer at a time. Layer ``i`` is calibrated on the outputs of
the already pruned layers ``0..i-1`` (the papers' sequential protocol).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import activity
from ..errors import LLMPruneError
from ..models.view import DecoderLayer, ModelView
from ..sparsity.bits import all_finite
from .capture import capture_layer_inputs, move_to
from .context import calibration_mode
from .devices import Replicas
from .heap import heap_allocations
from .observers import InputStats
from .routed import RoutedObserver

if TYPE_CHECKING:
    from ..methods.base import Method

log = logging.getLogger(__name__)


def layer_output(out: Any) -> Tensor:
    """Decoder layers return a tensor in transformers 5 and a tuple in older code; normalise here only."""
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def onloaded(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Keep ``module`` on ``device`` for the block, then put it back where it was."""
    params = list(module.parameters())
    home = params[0].device if params else device
    if home != device:
        module.to(device)
    try:
        yield
    finally:
        if home != device:
            module.to(home)


@contextmanager
def _outside_layers_onloaded(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> Iterator[None]:
    layer_ids = {id(p) for p in layers.parameters()}
    moved = [(p, p.data) for p in model.parameters() if id(p) not in layer_ids and p.device != device]
    moved_buffers = [(b, b.data) for b in model.buffers() if b.device != device]
    for p, data in moved + moved_buffers:
        p.data = data.to(device)
    try:
        yield
    finally:
        for p, data in moved + moved_buffers:
            p.data = data


class _Captured(Exception):
    """Ends a layer forward once the captured sub-module has run."""


@dataclass
class LayerContext:
    """One decoder layer with its calibration inputs, as a method sees it."""

    layer: DecoderLayer
    device: torch.device
    cache_device: torch.device
    hidden: list[Tensor] = field(default_factory=list)
    args: list[tuple[Any, ...]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, InputStats] = field(default_factory=dict)
    outputs: list[Tensor] | None = None  # the layer's dense outputs, when the method propagates dense
    # Copies of the layer on the extra devices of a multi-device run: observe() and forward() split
    # the batches over them (see engine.devices); everything else runs on ``device``.
    replicas: Replicas | None = None
    # MoE layers: how each expert is calibrated (engine.routed) and, once observed, the tokens each saw.
    moe_calib: str = "routed"
    expert_report: dict[str, Any] | None = None

    @property
    def num_batches(self) -> int:
        return len(self.hidden)

    def shared_input_groups(self, names: Iterable[str]) -> list[list[str]]:
        """``names`` grouped by the statistics object they share: linears fed the very same input
        (q/k/v, gate/up; see :meth:`observe`), in first-seen order."""
        groups: dict[int, list[str]] = {}
        for name in names:
            groups.setdefault(id(self.stats[name]), []).append(name)
        return list(groups.values())

    def run_batch(self, b: int, module: nn.Module | None = None, device: torch.device | None = None) -> Tensor:
        """Forward calibration batch ``b`` through the layer (or ``module``, on ``device``)."""
        module = module if module is not None else self.layer.module
        device = device if device is not None else self.device
        out = module(
            self.hidden[b].to(device),
            *move_to(self.args[b], device),
            **move_to(self.kwargs[b], device),
        )
        return layer_output(out)

    def forward(self, *, one_device: bool = False) -> list[Tensor]:
        """Outputs of the layer, as it is now, for every calibration batch (on ``cache_device``).
        ``one_device``: all batches in order on ``device`` even with replicas (a forward hook on the
        layer's own modules then sees every batch)."""

        def outputs_of(module: nn.Module, device: torch.device, batches: list[int]) -> dict[int, Tensor]:
            out = {}
            for b in batches:
                y = self.run_batch(b, module, device)
                self._check_finite(y)
                out[b] = y.to(self.cache_device)
            return out

        if self.replicas is None or one_device:
            return list(outputs_of(self.layer.module, self.device, list(range(self.num_batches))).values())
        self.replicas.sync(self.layer.module)
        merged: dict[int, Tensor] = {}
        for part in self.replicas.run(self.layer.module, self.device, self.num_batches, outputs_of):
            merged.update(part)
        return [merged[b] for b in range(self.num_batches)]

    def _check_finite(self, out: Tensor) -> None:
        if not all_finite(out):
            raise LLMPruneError(
                f"NaN or inf in the output activations of decoder layer {self.layer.index}; "
                f"the model overflows in this dtype (try --set model.dtype=float32)"
            )

    def capture_io(self, module: nn.Module) -> Iterator[tuple[tuple[Any, ...], dict[str, Any], Any]]:
        """Run the batches through the layer one at a time; yield ``module``'s (args, kwargs, output).

        Used by methods that work on sub-blocks (attention, MLP) of the layer. Batch ``b + 1`` runs
        only when the caller asks for it, so a caller that spends each record before the next holds
        one batch's activations, not the whole calibration set's (keep them, on ``cache_device``, if
        they are needed again). The records are on ``device``; the hook is armed only while the
        layer runs, so the caller may run ``module`` itself between records. The layer forward stops
        once ``module`` has run (nothing after it is needed), which saves e.g. the MLP when capturing
        the attention.
        """
        slot: list[tuple[tuple[Any, ...], dict[str, Any], Any]] = []

        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            slot.append((args, kwargs, output))
            raise _Captured

        for b in range(self.num_batches):
            handle = module.register_forward_hook(hook, with_kwargs=True)
            try:
                with suppress(_Captured):
                    self.run_batch(b)
            finally:
                handle.remove()
            if len(slot) != 1:
                raise LLMPruneError(f"layer {self.layer.index}: {type(module).__name__} did not run exactly once "
                                    f"in the layer's forward")
            yield slot.pop()

    def observe(
        self,
        hessian: bool,
        keep_outputs: bool = False,
        prune_now: Callable[[str, nn.Linear, InputStats], None] | None = None,
        moments: bool = True,
    ) -> dict[str, InputStats]:
        """Run the layer once with input statistics collected for every linear.

        Linears that receive the very same input tensor (q/k/v, gate/up) share one statistics
        object, so X^T X is computed once per distinct input (``moments``: also their per-column
        mean and variance, see :class:`InputStats`). With ``keep_outputs`` the layer's
        outputs of this same pass are kept in ``self.outputs`` (on ``cache_device``); without it
        the forward of each batch stops as soon as every linear has seen its input (Wanda's
        statistics pass then skips the layer's last matmul, the MLP down projection).

        ``prune_now`` (one batch only: all calibration windows in one forward) is called with each
        linear and its finished statistics before that linear's own forward runs, so it can prune
        it in place: later linears of the layer then see inputs computed by the pruned ones
        ("true sequential" calibration), and the pass's outputs, kept in ``self.outputs``, are
        the pruned layer's outputs.
        """
        if prune_now is not None and self.num_batches != 1:
            raise ValueError("observe(prune_now=...) needs all calibration windows in one batch")
        keep_outputs = keep_outputs or prune_now is not None
        options = dict(hessian=hessian, keep_outputs=keep_outputs, prune_now=prune_now, moments=moments)
        if self.replicas is None or prune_now is not None or self.layer.is_moe:
            stats, outputs = self._observe_share(self.layer.module, self.device, list(range(self.num_batches)), **options)
        else:  # the copies were made from the layer as it is now (observing comes before pruning)
            parts = self.replicas.run(self.layer.module, self.device, self.num_batches,
                                      lambda module, device, batches: self._observe_share(module, device, batches,
                                                                                          **options))
            stats, outputs = parts[0]
            for other_stats, other_outputs in parts[1:]:
                merged: set[int] = set()
                for name, st in stats.items():  # shared objects (q/k/v) merged once
                    if id(st) not in merged and name in other_stats:
                        st.merge_(other_stats[name])
                        merged.add(id(st))
                for name, st in other_stats.items():  # a linear only another device's batches reached
                    stats.setdefault(name, st)
                outputs.update(other_outputs)
        if keep_outputs:
            self.outputs = [outputs[b] for b in range(self.num_batches)]
        for name, st in stats.items():
            if st.nonfinite:
                raise LLMPruneError(
                    f"NaN or inf in the input activations of layer {self.layer.index} {name}; "
                    f"the model overflows in this dtype (try --set model.dtype=float32)"
                )
        missing = set(self.layer.linears) - set(stats)
        if missing:
            raise LLMPruneError(f"layer {self.layer.index}: linears {sorted(missing)} were never called in forward")
        return stats

    def _observe_share(
        self,
        module: nn.Module,
        device: torch.device,
        batches: list[int],
        *,
        hessian: bool,
        keep_outputs: bool,
        prune_now: Callable[[str, nn.Linear, InputStats], None] | None,
        moments: bool,
    ) -> tuple[dict[str, InputStats], dict[int, Tensor]]:
        """:meth:`observe` of ``batches`` on ``module`` (the layer, or its copy on another device)."""
        linears = self.layer.linears if module is self.layer.module else {
            name: module.get_submodule(name) for name in self.layer.linears}
        dense = {name: lin for name, lin in linears.items() if isinstance(lin, nn.Module)}
        stats: dict[str, InputStats] = {}
        source_of: dict[str, str] = {}
        live: dict[int, str] = {}  # id(input tensor) -> linear that accumulates it, within one batch
        keep_alive: list[Tensor] = []
        seen: set[str] = set()  # linears that saw their input in this batch

        def make_hook(name: str, linear: nn.Linear) -> Callable[..., None]:
            def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0]
                if name not in source_of:
                    owner = live.get(id(x))
                    if owner is not None and owner != name:
                        source_of[name] = owner
                        stats[name] = stats[owner]
                    else:
                        if name not in stats:
                            stats[name] = InputStats(linear.in_features, hessian=hessian, device=device,
                                                     moments=moments)
                        stats[name].update(x)
                        live[id(x)] = name
                        keep_alive.append(x)
                seen.add(name)
                if prune_now is not None:
                    prune_now(name, linear, stats[name])
                if not keep_outputs and seen.issuperset(linears):
                    raise _Captured  # every statistic of this batch is in; the rest of the forward is not needed

            return hook

        handles = [lin.register_forward_pre_hook(make_hook(name, lin)) for name, lin in dense.items()]
        routed = [RoutedObserver(group, self.moe_calib, stats, seen, hessian=hessian, moments=moments, device=device,
                                 prune_now=prune_now) for group in self.layer.experts
                  if any(name in linears for name in group.linears)]  # moe.targets may leave the experts out

        def routed_hook(observer: RoutedObserver) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                observer.hook(module, args, kwargs)
                if not keep_outputs and seen.issuperset(linears):
                    raise _Captured

            return hook

        handles += [obs.group.module.register_forward_pre_hook(routed_hook(obs), with_kwargs=True) for obs in routed]
        outputs: dict[int, Tensor] = {}
        try:
            for b in batches:
                with suppress(_Captured):
                    out = self.run_batch(b, module, device)
                    if keep_outputs:
                        self._check_finite(out)
                        outputs[b] = out.to(self.cache_device)
                live.clear()
                keep_alive.clear()
                seen.clear()
        finally:
            for handle in handles:
                handle.remove()
        if routed:
            self.expert_report = {obs.group.path: obs.finish() for obs in routed}
        return stats, outputs


class LayerStore:
    """Where the decoder layers live between steps of :func:`run_layerwise`.

    This default keeps the whole model in memory and does nothing. The streaming store
    (:mod:`llmprune.engine.streaming`) loads each layer from the checkpoint's shards before its
    step, writes it to the output and frees it afterwards, and records progress for resuming.
    """

    start: int = 0  # layers before this one are already done (a resumed run)
    reports: list[dict[str, Any]] = []  # noqa: RUF012  (never mutated: the done layers' reports)

    def resumed_hidden(self) -> list[Tensor] | None:
        """The inputs of layer ``start`` saved by an interrupted run, if any."""
        return None

    def inputs_captured(self) -> None:
        """Called once the layers' inputs are recorded (the modules before the first layer have run)."""

    @contextmanager
    def loaded(self, layer: DecoderLayer) -> Iterator[None]:
        """Keep ``layer``'s weights materialised for the block."""
        yield

    def done(self, layer: DecoderLayer, report: dict[str, Any], hidden: list[Tensor] | None) -> list[Tensor] | None:
        """Called inside :meth:`loaded` once ``layer`` is pruned; returns the inputs of the next layer."""
        return hidden


def run_layerwise(
    view: ModelView,
    method: Method,
    calib_ids: Tensor | None,
    *,
    device: torch.device,
    cache_device: torch.device | None = None,
    batch_size: int = 1,
    progress: bool = False,
    store: LayerStore | None = None,
    extra_devices: Sequence[torch.device] = (),
    moe_calib: str = "routed",
) -> list[dict[str, Any]]:
    """Prune every decoder layer of ``view`` with ``method``; return one report dict per layer.

    calib_ids: (num_samples, seqlen) token ids, or None for data-free methods.

    ``method.propagate`` says what layer ``i + 1`` is calibrated on: the outputs of the pruned
    layer ``i`` ("pruned", the papers' sequential protocol for Wanda/SparseGPT/Barber), or its
    dense outputs ("dense", CFSP: every statistic comes from one pass of the dense model, which
    is also what lets a global allocation run after all layers were seen). For "dense" the
    outputs come from the same pass that observes the statistics, so each layer runs once.
    The caller runs ``method.finalize(view)`` afterwards (global allocation, channel removal).

    ``store`` decides where the layers live (default: all in memory); a streaming store loads one
    layer at a time and may resume after ``store.start`` layers.

    ``extra_devices``: more compute devices; the calibration batches of each layer's observing and
    propagating forwards are split over ``device`` and these (:mod:`llmprune.engine.devices`).

    Large temporaries come from the heap during the run, and freed pages are given back between
    layers once resident memory has grown enough (:mod:`llmprune.engine.heap`), which spares the
    page faults of fresh ``mmap`` allocations.
    """
    cache_device = cache_device or device
    # Passes over every layer before this method's own: the allocation's statistics of the dense model
    # (OWL; its finalize gives the method each layer's sparsity), then e.g. every layer pruned by
    # Barber's initializer before any is rebuilt.
    allocating = method.allocation_pass()
    for first in (allocating, method.initial_pass()):
        if first is None:
            continue
        if store is not None and type(store) is not LayerStore:
            raise LLMPruneError(f"method {method.name} runs {first.name} over every layer first, which a streamed "
                                f"run (one layer at a time) cannot do; prune in memory (model.stream=off)")
        run_layerwise(view, first, calib_ids, device=device, cache_device=cache_device, batch_size=batch_size,
                      progress=progress, extra_devices=extra_devices, moe_calib=moe_calib)
        if first is allocating:
            first.finalize(view)
    store = store or LayerStore()
    model = view.model
    reports: list[dict[str, Any]] = [dict(r) for r in store.reports]
    todo = view.layers[store.start:]
    bar = tqdm(todo, desc=f"{method.name}: layers", disable=not progress, unit="layer",
               initial=store.start, total=len(view.layers))
    with calibration_mode(model), heap_allocations() as heap:
        if not method.needs_calibration:
            for layer in bar:
                activity.update(stage="layers", layer=layer.index + 1, layers=len(view.layers), task=method.name)
                with store.loaded(layer):
                    with onloaded(layer.module, device):
                        ctx = LayerContext(layer, device, cache_device)
                        with method.at_layer(layer.index):
                            report = _timed(ctx, lambda ctx=ctx: method.prune_layer(ctx))
                    store.done(layer, report, None)
                heap.trim()
                reports.append(report)
            return reports
        if calib_ids is None:
            raise LLMPruneError(f"method {method.name} needs calibration data")
        # sequential="linear" prunes each linear inside the one forward of its layer, which needs
        # every calibration window in that forward: one batch, whatever batch_size says.
        linear_sequential = method.sequential == "linear"
        batches = [calib_ids] if linear_sequential else list(calib_ids.split(batch_size))
        with _outside_layers_onloaded(model, view.layer_list, device):
            inputs = capture_layer_inputs(model, view.layer_list, batches, device=device, cache_device=cache_device)
        store.inputs_captured()
        resumed = store.resumed_hidden()
        hidden = inputs.hidden if resumed is None else resumed
        dense = method.propagate == "dense"
        pool = ThreadPoolExecutor(len(extra_devices), thread_name_prefix="llmprune-device") if extra_devices else None
        try:
            for layer in bar:
                activity.update(stage="layers", layer=layer.index + 1, layers=len(view.layers), task=method.name)
                with store.loaded(layer):
                    with onloaded(layer.module, device):
                        ctx = LayerContext(layer, device, cache_device, hidden, inputs.args[layer.index],
                                           inputs.kwargs[layer.index], moe_calib=moe_calib)
                        if pool is not None and not linear_sequential and not layer.is_moe:
                            ctx.replicas = Replicas(layer.module, extra_devices, pool)
                        if linear_sequential:
                            with method.at_layer(layer.index):  # the layer's allocated sparsity
                                report = _timed(ctx, lambda ctx=ctx: _prune_while_observing(method, ctx))
                        else:
                            if method.stats is not None or dense:
                                ctx.stats = ctx.observe(**_stats_kind(method), keep_outputs=dense)
                            with method.at_layer(layer.index):
                                report = _timed(ctx, lambda ctx=ctx: method.prune_layer(ctx))
                        if ctx.expert_report is not None:
                            report["experts"] = ctx.expert_report
                        hidden = ctx.outputs if ctx.outputs is not None else ctx.forward()
                        ctx.replicas = None  # the copies go with this layer
                    hidden = store.done(layer, report, hidden)
                reports.append(report)
                inputs.args[layer.index], inputs.kwargs[layer.index] = [], []  # free what this layer needed
                heap.trim()  # free pages go back to the system once memory grew past the budget (see heap)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
    return reports


def _stats_kind(method: Method) -> dict[str, bool]:
    """``observe``'s flags for what ``method.stats`` asks of each linear's input."""
    return {"hessian": method.stats == "hessian", "moments": method.stats == "moments"}


def _timed(ctx: LayerContext, step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one layer's pruning ``step``; its report with the layer index and the time it took."""
    start = time.perf_counter()
    report = step()
    report = {"layer": ctx.layer.index, **report, "time_s": round(time.perf_counter() - start, 4)}
    log.debug("layer %d pruned: %s", ctx.layer.index, report)
    return report


def _prune_while_observing(method: Method, ctx: LayerContext) -> dict[str, Any]:
    """``sequential="linear"``: observe and prune in one forward; the report has prune_layer's shape."""
    sparsity: dict[str, float] = {}

    def prune_now(name: str, linear: nn.Linear, stats: InputStats) -> None:
        sparsity[name] = method.prune_linear(name, linear, stats)

    ctx.stats = ctx.observe(**_stats_kind(method), prune_now=prune_now)
    return {"sparsity": {name: sparsity[name] for name in ctx.layer.linears},
            **({"experts": ctx.expert_report} if ctx.expert_report is not None else {})}
