"""llmprune: one-shot pruning of large language models, with numbers you can trust.

Public API::

    import llmprune
    result = llmprune.prune("smollm2-135m", method="wanda", sparsity=0.5, eval="wikitext2",
                            data_dir="../shared/data", output="runs/wanda50")
    llmprune.evaluate("runs/wanda50", datasets="wikitext2", tasks="offline", data_dir="../shared/data")
    llmprune.sweep("smollm2-135m", values=[0.3, 0.5, 0.7], method="wanda", output="runs/sweep")
    llmprune.recover("runs/cfsp20", output="runs/cfsp20-lora", steps=100, data_dir="../shared/data")
    llmprune.export("runs/cfsp20", "cfsp20.gguf", type="q8_0")  # runs in llama.cpp

The names are imported on first use (module ``__getattr__``): ``import llmprune`` and the command
line's ``--help`` do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from .errors import LLMPruneError

if TYPE_CHECKING:
    from .api import PruneResult, evaluate, load, prune
    from .deploy import ExportResult, export
    from .methods import METHODS
    from .recipe import Recipe, load_recipe
    from .recovery import RecoveryResult, recover
    from .sweeps import SweepResult, sweep

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
# public name -> the submodule that defines it
_LAZY = {
    "PruneResult": "api", "evaluate": "api", "load": "api", "prune": "api",
    "METHODS": "methods",
    "ExportResult": "deploy", "export": "deploy",
    "Recipe": "recipe", "load_recipe": "recipe",
    "RecoveryResult": "recovery", "recover": "recovery",
    "SweepResult": "sweeps", "sweep": "sweeps",
}
__all__ = ["METHODS", "ExportResult", "LLMPruneError", "PruneResult", "Recipe", "RecoveryResult", "SweepResult",
           "evaluate", "export", "load", "load_recipe", "prune", "recover", "sweep"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llmprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
