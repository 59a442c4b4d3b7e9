"""Ending a recovery run without undoing the pruning.

* ``merge`` (structured or dense models): fold every LoRA delta into its (smaller) weight with
  PEFT's ``merge_and_unload``; the widths do not change, and the merged model computes the same
  function (the report records the largest logit difference merged vs unmerged).
* ``mask`` (sparse models): merge, then multiply each weight by its original non-zero mask, so the
  zeros are exactly where pruning put them. The low-rank delta at the masked positions is lost;
  the report records what that costs (loss, and perplexity when an evaluation is configured).
* ``adapter`` (any model): keep the base weights untouched and save the adapter beside them, in
  ``DIR/adapter`` (PEFT's format); ``llmprune.load(DIR)`` applies it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..engine.context import calibration_mode

MERGE_MODES = ("merge", "mask", "adapter")
ADAPTER_DIR = "adapter"


def weight_masks(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """Non-zero masks of the named linears' weights (taken before training)."""
    return {name: model.get_submodule(name).weight.detach() != 0 for name in names}


def mean_loss(model: nn.Module, ids: Tensor, device: torch.device) -> float:
    with calibration_mode(model):
        return float(model(input_ids=ids.to(device), labels=ids.to(device), use_cache=False).loss)


def logits(model: nn.Module, ids: Tensor, device: torch.device) -> Tensor:
    with calibration_mode(model):
        return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


def merge_adapter(peft_model: Any, mode: str, masks: dict[str, Tensor] | None, check_ids: Tensor,
                  device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Merge (``merge``/``mask``) a trained PEFT model; returns the plain model and what the merge did."""
    before = logits(peft_model, check_ids, device)
    loss_before = mean_loss(peft_model, check_ids, device)
    model = peft_model.merge_and_unload()
    info: dict[str, Any] = {"mode": mode}
    if mode == "mask":
        assert masks is not None
        with torch.no_grad():
            for name, mask in masks.items():
                weight = model.get_submodule(name).weight
                weight.mul_(mask.to(weight.device, weight.dtype))
    after = logits(model, check_ids, device)
    info.update({
        "check_tokens": int(check_ids.numel()),
        "max_abs_logit_diff": float((after - before).abs().max()),
        "loss_unmerged": loss_before, "loss_merged": mean_loss(model, check_ids, device),
    })
    return model, info
