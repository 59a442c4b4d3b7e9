"""The recovery training loop: causal-LM loss on fixed token windows, AdamW, resumable checkpoints.

The loop runs under ``accelerate.Accelerator``, so ``accelerate launch`` or ``torchrun`` on several
GPUs (or ``torchrun`` with CPU processes, gloo) runs it unchanged: at step s process p takes windows
``[(s * P + p) * B, (s * P + p + 1) * B)`` of the pre-drawn windows (P processes, batch B per
process), so the data a step sees depends only on the step (the data position of a checkpoint is
its step). The learning-rate schedule counts optimizer steps (the scheduler is stepped by hand, not
through ``prepare``), so it is the same for any number of processes.

Checkpoint (main process, every ``checkpoint_every`` steps): one file ``checkpoint.pt`` in the run's
work folder, written to a temporary name and moved into place with ``os.replace`` (a crash leaves
the previous checkpoint intact), holding the adapter weights, optimizer and scheduler state, the
step, the RNG states and the loss / evaluation history.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import activity
from ..io.save import follow_umask

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    warmup: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 0  # 0: never
    eval_every: int = 0  # 0: never


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` of the peak at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def read_checkpoint(work: Path) -> dict[str, Any] | None:
    path = work / CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)  # type: ignore[no-any-return]


def _write_checkpoint(work: Path, state: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=work, prefix=f".{CHECKPOINT}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        follow_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, work / CHECKPOINT)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train(model: Any, windows: Tensor, cfg: TrainConfig, work: Path, *, cpu: bool,
          evaluate: Callable[[Any], dict[str, Any]] | None = None, progress: bool = False,
          on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train the trainable parameters of ``model`` (a PEFT model) in place; returns the loss and eval history.

    Resumes from ``work/checkpoint.pt`` when it exists (the caller checked that it belongs to the same
    settings). ``on_step(step)`` is called after each finished step (after its checkpoint): a hook for
    tests and callers to stop a run.
    """
    from accelerate import Accelerator
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    accelerator = Accelerator(cpu=cpu)
    world = accelerator.num_processes
    need = cfg.steps * cfg.batch_size * world
    if windows.shape[0] < need:
        raise ValueError(f"{windows.shape[0]} training windows for {need} (steps x batch x processes)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup, cfg.min_lr_ratio))
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    state = read_checkpoint(work)
    start, losses, evals, elapsed = 0, [], [], 0.0
    if state is not None:
        set_peft_model_state_dict(unwrapped, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        start, losses, evals, elapsed = state["step"], list(state["losses"]), list(state["evals"]), state["elapsed_s"]

    def checkpoint(step: int) -> None:
        if accelerator.is_main_process:
            _write_checkpoint(work, {
                "step": step,
                "adapter": {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(unwrapped).items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                "losses": losses, "evals": evals, "elapsed_s": elapsed + time.perf_counter() - t0,
            })
            activity.update(checkpoint_step=step)
        accelerator.wait_for_everyone()

    t0 = time.perf_counter()
    model.train()
    bar = tqdm(total=cfg.steps, initial=start, desc="recovery", unit="step",
               disable=not progress or not accelerator.is_main_process)
    activity.update(stage="steps", step=start, steps=cfg.steps, partial=str(work),
                    checkpoint_step=start if cfg.checkpoint_every else None)
    for step in range(start, cfg.steps):
        activity.update(step=step + 1)
        first = (step * world + accelerator.process_index) * cfg.batch_size
        ids = windows[first:first + cfg.batch_size].to(accelerator.device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(accelerator.reduce(loss.detach(), "mean").item())
        if not math.isfinite(value):
            from ..errors import LLMPruneError

            raise LLMPruneError(f"the training loss became {value} at step {step + 1}; lower --lr")
        losses.append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}")
        done = step + 1
        if evaluate is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            if accelerator.is_main_process:
                evals.append({"step": done, **evaluate(unwrapped)})
            accelerator.wait_for_everyone()
            model.train()
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            checkpoint(done)
        if on_step is not None:
            on_step(done)
    bar.close()
    model.eval()
    return {"losses": losses, "evals": evals, "resumed_from": start or None,
            "train_s": elapsed + time.perf_counter() - t0}
