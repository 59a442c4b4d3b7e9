"""Pruning methods, one per file, registered by name in :data:`METHODS`."""

from .base import METHODS, Method

# Registration happens on import; keep these explicit.
from . import barber, cfsp, experts, magnitude, sparsegpt, structured_baselines, wanda  # noqa: E402,F401  isort: skip

__all__ = ["METHODS", "Method"]
