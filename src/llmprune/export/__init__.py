"""Export models for other runtimes: ``export_gguf`` writes a GGUF file that llama.cpp runs."""

from __future__ import annotations

from .to_gguf import GGUF_TYPES, KEEPS_ZEROS, ExportResult, export

__all__ = ["GGUF_TYPES", "KEEPS_ZEROS", "ExportResult", "export"]
