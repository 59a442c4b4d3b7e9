"""Recovery fine-tuning after pruning: importance-guided LoRA (IG-LoRA) with merges that keep the pruning."""

from .api import RecoveryResult, recover

__all__ = ["RecoveryResult", "recover"]
