"""Several compute devices for one layer-wise run: calibration batches split over copies of the layer.

The layer-wise methods spend their time in forwards of one decoder layer over the calibration
batches (the statistics pass, and the pruned layer's outputs for the next layer). With several
devices (``--device cuda:0,cuda:1,...``) the engine keeps a copy of the current layer on every
extra device and gives each device its share of the batches (batch ``b`` to device ``b % k``):
every device accumulates the input statistics of its own batches, which are then summed on the
first device (Wanda's ||X_j||^2, SparseGPT's X^T X and the structured methods' moments are sums
over tokens, so the split changes nothing but the order of the float32 additions), and each
device computes the outputs of its own batches. The pruning itself (scores, masks, the OBS solve,
Barber's gradient passes) runs on the first device, which also holds the model between layers;
the copies get the pruned weights before the propagating forward.

This is the data-parallel calibration of llm-compressor's GPTQ and of the ECOSYSTEM notes, not a
split of the model over devices: one decoder layer at a time fits any device that can compute
one, so memory never needs the model spread out (the model stays on the host, or on disk when
streaming). Each device is driven from its own host thread (CUDA kernels release the GIL).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")


class Replicas:
    """Copies of one decoder layer on the extra devices of a multi-device run."""

    def __init__(self, module: nn.Module, devices: Sequence[torch.device], pool: ThreadPoolExecutor) -> None:
        self.devices = list(devices)
        self.pool = pool
        self.modules = [copy.deepcopy(module).to(device) for device in self.devices]

    def sync(self, module: nn.Module) -> None:
        """Copy ``module``'s (the original layer's) current weights, e.g. once pruned, into every copy."""
        state = module.state_dict()
        for replica in self.modules:
            replica.load_state_dict(state)

    def run(self, primary: nn.Module, primary_device: torch.device, num_batches: int,
            work: Callable[[nn.Module, torch.device, list[int]], T]) -> list[T]:
        """``work(module, device, batches)`` on every device at once, each with its share of the batches
        (the first device on the calling thread); the results in device order."""
        modules, devices = [primary, *self.modules], [primary_device, *self.devices]
        shares = [list(range(w, num_batches, len(devices))) for w in range(len(devices))]

        def in_thread(w: int) -> T:
            with torch.no_grad():  # grad mode is per thread; the engine's no_grad does not reach this one
                return work(modules[w], devices[w], shares[w])

        futures: list[Future[T]] = [self.pool.submit(in_thread, w) for w in range(1, len(devices))]
        try:
            first = work(modules[0], devices[0], shares[0])
        finally:
            for future in futures:  # never leave a thread computing on a layer that is about to go
                future.exception()
        return [first, *(future.result() for future in futures)]
