"""Deployment: ``export`` writes a model as a GGUF file that llama.cpp runs.

The package is named ``deploy``, not ``export``, so that it never shadows the function ``llmprune.export``
(importing a submodule ``llmprune.export`` would rebind that attribute of the package to the module)."""

from __future__ import annotations

from .to_gguf import GGUF_TYPES, KEEPS_ZEROS, ExportResult, export

__all__ = ["GGUF_TYPES", "KEEPS_ZEROS", "ExportResult", "export"]
