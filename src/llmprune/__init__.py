"""llmprune: one-shot pruning of large language models, with numbers you can trust.

Public API::

    import llmprune
    result = llmprune.prune("smollm2-135m", method="wanda", sparsity=0.5, eval="wikitext2",
                            data_dir="../shared/data", output="runs/wanda50")
    llmprune.evaluate("runs/wanda50", datasets="wikitext2", tasks="offline", data_dir="../shared/data")
    llmprune.sweep("smollm2-135m", values=[0.3, 0.5, 0.7], method="wanda", output="runs/sweep")
    llmprune.recover("runs/cfsp20", output="runs/cfsp20-lora", steps=100, data_dir="../shared/data")
    llmprune.export("runs/cfsp20", "cfsp20.gguf", type="q8_0")  # runs in llama.cpp
"""

from __future__ import annotations

import logging

from .api import PruneResult, evaluate, load, prune
from .errors import LLMPruneError
from .export import ExportResult, export
from .methods import METHODS
from .recipe import Recipe, load_recipe
from .recovery import RecoveryResult, recover
from .sweeps import SweepResult, sweep

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
__all__ = ["METHODS", "ExportResult", "LLMPruneError", "PruneResult", "Recipe", "RecoveryResult", "SweepResult",
           "evaluate", "export", "load", "load_recipe", "prune", "recover", "sweep"]
