"""``--preset NAME`` (``preset=`` in the API): named method settings that ship inside the package.

- ``best``: per sparsity setting (50/60/70% unstructured, 2:4, 4:8), the configuration that measured
  the lowest perplexity on SmolLM2 within the issue's budget (pruning time <= 4 x our Wanda's, peak
  RSS <= 1.5 x, in the same benchmark file). One YAML file per measured setting under
  ``llmprune/presets/best/``: a ``method`` section and the ``benchmark`` file whose row backs it
  (``tests/test_presets.py`` checks that row is the best admissible one of its file). A setting
  without a measured preset is refused with the list of those that exist: a preset is chosen by a
  benchmark, never by guess.
- ``faithful``: the method as its released code runs it, i.e. ``method.faithful=true`` (wanda,
  sparsegpt, barber, cfsp, flap; docs/faithful.md).

The files live in the package rather than the repository's ``recipes/`` so an installed wheel has
them; ``recipes/best`` links here for readers of the repository.

A preset fills in the ``method`` section *under* what the user gives: a recipe file, flags and
``--set`` override its options, except the method's name, which the ``best`` preset chooses (naming
another method is refused). The saved recipe holds the resolved options, so a run folder re-runs
without the preset.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from ..errors import LLMPruneError, did_you_mean

BEST_DIR = Path(__file__).parent / "best"
PRESETS = {
    "best": "the lowest-perplexity configuration measured for the requested sparsity or N:M pattern",
    "faithful": "the method as its released code runs it (method.faithful=true)",
}


def setting_of(method: dict[str, Any]) -> str:
    """The ``best`` preset's key for a method section: ``2of4`` for ``pattern: 2:4``, ``unstructured70``
    for ``sparsity: 0.7`` (0.5 when neither is given, the unstructured methods' default)."""
    pattern = method.get("pattern")
    if pattern not in (None, "unstructured"):
        return str(pattern).replace(":", "of")
    sparsity = method.get("sparsity", 0.5)
    sparsity = 0.5 if sparsity is None else float(sparsity)
    percent = sparsity * 100
    if not math.isclose(percent, round(percent), abs_tol=1e-6):
        return f"unstructured{percent:g}"
    return f"unstructured{round(percent)}"


@cache
def best_presets() -> dict[str, dict[str, Any]]:
    """Every shipped ``best`` preset by setting: ``{"method": {...}, "benchmark": "benchmarks/results/..."}``."""
    found = {}
    for path in sorted(BEST_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("method"), dict) or "benchmark" not in data:
            raise LLMPruneError(f"preset file {path} is damaged: it needs a method section and a benchmark; "
                                f"reinstall llmprune")
        found[path.stem] = data
    return found


def _describe(setting: str) -> str:
    return setting.replace("unstructured", "").replace("of", ":") + ("%" if setting.startswith("unstructured") else "")


def check_name(name: str) -> None:
    if name not in PRESETS:
        raise LLMPruneError(f"unknown preset {name!r}{did_you_mean(name, list(PRESETS))}; presets: "
                            + "; ".join(f"{k} ({v})" for k, v in PRESETS.items()))


def apply_preset(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a merged recipe dict, before validation) with preset ``name`` filled in under it."""
    check_name(name)
    method = dict(data.get("method") or {})
    if name == "faithful":
        from ..methods import METHODS

        supported = sorted(n for n in METHODS.names() if METHODS.get(n).Options.faithful_form is not None)
        if method.get("name") not in supported:
            given = f"method {method['name']!r}" if method.get("name") else "no method"
            raise LLMPruneError(f"--preset faithful needs one of the methods with a released reference: "
                                f"{', '.join(supported)} (got {given}); add --method NAME")
        if method.get("faithful") is False:
            raise LLMPruneError("--preset faithful sets method.faithful=true; drop method.faithful=false")
        return {**data, "method": {**method, "faithful": True}}
    setting = setting_of(method)
    presets = best_presets()
    if setting not in presets:
        measured = ", ".join(_describe(s) for s in sorted(presets))
        raise LLMPruneError(f"--preset best has no measured configuration for {_describe(setting)} (measured: "
                            f"{measured}); choose one of those with --sparsity / --pattern, or name a --method "
                            f"for this setting yourself")
    chosen = presets[setting]["method"]
    if method.get("name") not in (None, chosen["name"]):
        raise LLMPruneError(f"--preset best chooses the method for {_describe(setting)} ({chosen['name']}); "
                            f"drop --method {method['name']}, or drop --preset to run {method['name']} yourself")
    return {**data, "method": {**chosen, **method}}
