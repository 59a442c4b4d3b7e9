"""Sparsity reports and run metadata (versions, memory). No printing here."""

from __future__ import annotations

import contextlib
import platform
import resource
import sys
from typing import Any

import torch

from .engine.heap import malloc_policy
from .models.view import ModelView
from .sparsity.bits import count_zeros, nonzero
from .sparsity.patterns import Pattern


def sparsity_report(view: ModelView, pattern: Pattern | None = None) -> dict[str, Any]:
    """Zero fractions per linear, per layer and overall (over the decoder linears), with N:M validity."""
    zeros_total = numel_total = 0
    layers = []
    nm_valid = True
    for layer in view.layers:
        per_linear = {}
        lz = ln = 0
        for name, linear in layer.linears.items():
            weight = linear.weight.detach()
            zeros = count_zeros(weight)
            per_linear[name] = round(zeros / weight.numel(), 6)
            lz += zeros
            ln += weight.numel()
            if pattern is not None and pattern.is_nm:
                assert pattern.m is not None and pattern.n is not None
                if weight.shape[1] % pattern.m:
                    nm_valid = False
                else:
                    kept = nonzero(weight).reshape(weight.shape[0], -1, pattern.m).sum(-1)
                    nm_valid = nm_valid and bool((kept <= pattern.n).all())
        layers.append({"layer": layer.index, "sparsity": round(lz / ln, 6), "linears": per_linear})
        zeros_total += lz
        numel_total += ln
    out: dict[str, Any] = {
        "overall": zeros_total / numel_total,
        "zeros": zeros_total,
        "weights": numel_total,
        "layers": layers,
    }
    if pattern is not None and pattern.is_nm:
        out["pattern"] = f"{pattern.n}:{pattern.m}"
        out["nm_valid"] = nm_valid
    return out


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("llmprune", "transformers", "safetensors", "accelerate", "gguf", "pyarrow", "huggingface_hub", "lm_eval", "peft"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    out["torch_threads"] = str(torch.get_num_threads())
    out["malloc"] = malloc_policy()
    out["cpu"] = cpu_model()
    return out


def cpu_model() -> str:
    """The processor and the vector extensions that decide CPU matmul speed: bf16 matmuls ran about
    25x slower on an AVX2-only AMD EPYC than on an Intel host with AVX-512/AMX, float32 1.3-2x, so a
    timing means little without it. Linux's /proc/cpuinfo; elsewhere ``platform.processor()``."""
    name, flags = "", set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
        for line in info:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
            if name and flags:
                break
    name = name or platform.processor() or platform.machine() or "unknown"
    extensions = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx2") if f in flags]
    return f"{name} ({', '.join(extensions)})" if extensions else name
