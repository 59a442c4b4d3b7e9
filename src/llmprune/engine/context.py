"""Temporary model state for calibration, restored on exit even after an error."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def calibration_mode(model: nn.Module) -> Iterator[None]:
    """eval(), no KV cache, no autograd; restores train/eval and use_cache afterwards."""
    was_training = model.training
    config = getattr(model, "config", None)
    had_use_cache = hasattr(config, "use_cache")
    old_use_cache = getattr(config, "use_cache", None)
    model.eval()
    if had_use_cache:
        config.use_cache = False  # type: ignore[union-attr]
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if had_use_cache:
            config.use_cache = old_use_cache  # type: ignore[union-attr]
