"""Streaming: prune a checkpoint one decoder layer at a time, from its shards to output shards, resumably.

The model is built on the meta device; only the modules outside the decoder layers (embeddings,
final norm, head) are materialised. For each layer the store loads its tensors from the source
shards, the engine's usual step prunes it, and the store writes it into its own output shard and
sends it back to the meta device. The activations entering the next layer are saved to disk and
read back memory-mapped, so they do not have to stay in memory either.

Everything happens in a work folder beside the output (``.NAME.partial``). After every layer an
atomic ``progress.json`` records the layers written, their reports and a hash of the settings; a
re-run with the same settings continues after the last recorded layer and gives bit-identical
tensors, a re-run with other settings is refused. Only a complete result is moved to the output.

Methods that remove structure (CFSP and the structured baselines) decide globally, after every
layer was seen, so they stream in two passes: an observing pass (``observer``: each layer is read
and observed on the dense activations, nothing is written, and what the method recorded of the
layer is saved beside ``progress-observe.json`` instead), then the method's plan, then a writing
pass that reloads each layer, removes what the plan drops and writes the smaller layer. Both
passes resume.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import activity
from ..errors import LLMPruneError
from ..io.save import write_json_atomic
from ..models.shards import (
    INDEX_NAME,
    BufferPool,
    CheckpointLayout,
    ShardReader,
    assign_tensors,
    staging_buffer,
    write_safetensors,
)
from ..models.view import DecoderLayer, ModelView, check_finite_weights
from ..report import sparsity_report
from ..sparsity.patterns import Pattern
from .engine import LayerStore

PROGRESS_NAME = "progress.json"
OBSERVE_PROGRESS_NAME = "progress-observe.json"  # the observing pass of a method that removes structure
OUTSIDE_SHARD = "outside.safetensors"  # renamed to the final shard names when the run completes
_KILL_AFTER = "LLMPRUNE_TEST_KILL_AFTER_LAYER"  # tests: SIGKILL this process once layer N is recorded


def partial_dir(output: Path) -> Path:
    """The work folder of a streamed run into ``output`` (beside it, so the final move is a rename)."""
    return output.resolve().parent / f".{output.name}.partial"


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _layer_shard(index: int) -> str:
    return f"layer-{index:05d}.safetensors"


def _save_safetensors_atomic(tensors: dict[str, Tensor], path: Path, stage: Any = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write_safetensors(tensors, tmp, metadata={"format": "pt"}, stage=stage)
    os.replace(tmp, path)


def _save_torch_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _state_file(index: int) -> str:
    return f"state-{index:05d}.pt"


class StreamingStore(LayerStore):
    """Loads each decoder layer from ``reader`` before its step and writes it to ``work`` after it.

    With ``observer`` (a method with ``layer_state``/``restore_layer_state``) this is the observing
    pass of a two-pass run: layers are read, not written, and the method's record of each layer is
    saved (and restored on resume) instead.
    """

    def __init__(self, view: ModelView, reader: ShardReader, work: Path, settings: str, dtype: torch.dtype,
                 pattern: Pattern | None, observer: Any = None, save_dtype: torch.dtype | None = None) -> None:
        self.view, self.reader, self.work, self.settings = view, reader, work, settings
        self.layout = CheckpointLayout(view.model, reader.tensors)  # checkpoint names <-> the model's (MoE experts)
        self.dtype, self.pattern, self.observer = dtype, pattern, observer
        self.save_dtype = save_dtype or dtype  # what the shards are written in (io.provenance.saved_dtype)
        self.progress = work / (OBSERVE_PROGRESS_NAME if observer is not None else PROGRESS_NAME)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmprune-writer")
        self._pending: Future[None] | None = None
        self._pending_tensors: list[Tensor] = []  # the tensors of the shard being written, recycled once written
        self._pool = BufferPool()  # written layers' tensors, reused to read the next layers into
        self._handed_over: int | None = None  # the layer whose tensors went to the writer
        self._stage: Any = None  # the writer's staging buffer (made on its first shard)
        self.start = 0
        self.reports: list[dict[str, Any]] = []
        self.sparsity_layers: list[dict[str, Any]] = []
        self.counts = {"zeros": 0, "weights": 0, "nm_valid": True}
        work.mkdir(parents=True, exist_ok=True)
        if self.progress.is_file():
            state = json.loads(self.progress.read_text(encoding="utf-8"))
            if state.get("settings") != settings:
                raise LLMPruneError(
                    f"{work} holds an interrupted streamed run with different settings (model, recipe or "
                    f"calibration data differ); re-run with the same settings to resume it, or delete {work} "
                    f"to start over"
                )
            self.start = int(state["layers_done"])
            self.reports = state["reports"]
            self.sparsity_layers = state["sparsity_layers"]
            self.counts = state["counts"]
            if observer is not None:
                for i in range(self.start):
                    observer.restore_layer_state(i, torch.load(work / _state_file(i)))
        self.layer_prefix = f"{view.layers_path}."
        activity.update(partial=str(work), layers_done=self.start)

    @property
    def complete(self) -> bool:
        """Every layer is recorded as done (a finished pass, e.g. the observing one of a resumed run)."""
        return self.start >= len(self.view.layers)

    # --- the modules outside the decoder layers ------------------------------------------------

    def materialize_outside(self) -> None:
        """Load every tensor outside the decoder layers into the model; write them to the output once."""
        tensors = self.layout.load(self.reader, self.layout.names(self.layer_prefix, inside=False))
        assign_tensors(self.view.model, tensors, self.dtype)
        self.view.model.tie_weights()
        missing = [n for n, p in self.view.model.named_parameters() if p.is_meta and not n.startswith(self.layer_prefix)]
        if missing:
            raise LLMPruneError(f"{self.reader.folder}: the checkpoint lacks {missing[:5]}; it does not match its config")
        out = self.work / OUTSIDE_SHARD
        if not out.is_file():
            _save_safetensors_atomic(self.layout.revert({k: v.to(self.save_dtype) if v.is_floating_point() else v
                                                         for k, v in tensors.items()}), out)

    # --- LayerStore -----------------------------------------------------------------------------

    def inputs_captured(self) -> None:
        """The layers' inputs are recorded: the parameters outside the decoder layers (embeddings,
        final norm, head), already in the output, are not needed again. Freed, they leave room for
        the layers' work: 0.5 GB for LLaMA-2-7B's 32000-word vocabulary, 2 GB for a 128k one."""
        meta: dict[int, nn.Parameter] = {}  # one meta parameter per real one: tied embeddings stay tied
        for name, module in self.view.model.named_modules():
            if name == self.view.layers_path or name.startswith(self.layer_prefix):
                continue
            for leaf, param in module._parameters.items():
                if param is not None and not param.is_meta:
                    if id(param) not in meta:
                        meta[id(param)] = nn.Parameter(param.to("meta"), requires_grad=False)
                    module._parameters[leaf] = meta[id(param)]

    def resumed_hidden(self) -> list[Tensor] | None:
        if self.start == 0 or self.start >= len(self.view.layers):  # nothing to resume, or nothing left to run
            return None
        return torch.load(self.work / f"hidden-{self.start - 1:05d}.pt", mmap=True)

    @contextmanager
    def loaded(self, layer: DecoderLayer) -> Iterator[None]:
        prefix = f"{self.layer_prefix}{layer.index}."
        tensors = self.layout.load(self.reader, self.layout.names(prefix), self._pool)
        self._pool.clear()  # what did not fit this layer (a structured pass's smaller tensors) is not kept
        expected = set(layer.module.state_dict())
        got = {k[len(prefix):] for k in tensors}
        if expected - got:
            raise LLMPruneError(f"{self.reader.folder}: layer {layer.index} lacks {sorted(expected - got)[:5]} "
                                f"in the checkpoint; it does not match its config")
        assign_tensors(layer.module, {k[len(prefix):]: v for k, v in tensors.items()}, self.dtype)
        del tensors
        try:
            check_finite_weights(ModelView(self.view.model, self.view.layers_path, [layer]))
            yield
        finally:
            held = list(layer.module.state_dict().values())
            layer.module.to("meta")
            if self._handed_over != layer.index:  # nothing is written from them: reuse them right away
                self._pool.give(held)
            del held

    def done(self, layer: DecoderLayer, report: dict[str, Any], hidden: list[Tensor] | None) -> list[Tensor] | None:
        """Record ``layer`` as done: its shard (or, observing, the method's record of it), its report,
        the next layer's inputs, then the progress record.

        The shard and the progress record are written by a background thread while the engine goes
        on with the next layer (at most one layer in flight: the next call waits for it), so the
        disk's time is hidden behind compute. The progress record names a layer only once its shard
        is complete, so a run killed at any moment resumes correctly.
        """
        i = layer.index
        self.wait()
        shard = None
        if self.observer is not None:
            _save_torch_atomic(self.observer.layer_state(i), self.work / _state_file(i))
        else:
            # Detached references: the layer goes back to the meta device when this returns, the
            # tensors stay alive for the writer.
            own = {f"{self.layer_prefix}{i}.{k}": v.to(self.save_dtype) if v.is_floating_point() else v
                   for k, v in layer.module.state_dict().items()}
            self._pending_tensors, self._handed_over = list(own.values()), i
            shard = self.layout.revert(own)  # the checkpoint's names and layout (per-expert matrices)
            del own
            sp = sparsity_report(ModelView(self.view.model, self.view.layers_path, [layer]), self.pattern)
            self.sparsity_layers.append(sp["layers"][0])
            self.counts["zeros"] += sp["zeros"]
            self.counts["weights"] += sp["weights"]
            self.counts["nm_valid"] = self.counts["nm_valid"] and sp.get("nm_valid", True)
        self.reports.append(report)
        if hidden is not None:
            _save_torch_atomic([h.detach().cpu().contiguous() for h in hidden], self.work / f"hidden-{i:05d}.pt")
        progress = copy.deepcopy({
            "settings": self.settings, "layers_done": i + 1, "reports": self.reports,
            "sparsity_layers": self.sparsity_layers, "counts": self.counts,
        })
        self._pending = self._writer.submit(self._record, i, shard, progress)
        if hidden is None:
            return None
        return torch.load(self.work / f"hidden-{i:05d}.pt", mmap=True)

    def _record(self, i: int, shard: dict[str, Tensor] | None, progress: dict[str, Any]) -> None:
        """The writer thread's part of :meth:`done`."""
        if shard is not None:
            if self._stage is None:
                self._stage = staging_buffer()
            _save_safetensors_atomic(shard, self.work / _layer_shard(i), self._stage)
            shard.clear()  # the main thread recycles the tensors (wait); the executor may hold this dict a while
        write_json_atomic(self.progress, progress)
        activity.update(layers_done=i + 1)
        (self.work / f"hidden-{i - 1:05d}.pt").unlink(missing_ok=True)
        if os.environ.get(_KILL_AFTER) == (str(i) if self.observer is None else f"observe:{i}"):
            os.kill(os.getpid(), signal.SIGKILL)

    def wait(self) -> None:
        """Until the last layer handed to the writer is recorded (its error, if any, raised here)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
            self._pool.give(self._pending_tensors)  # written: their memory can hold a later layer

    def close(self) -> None:
        """Wait for the writer and stop it."""
        self.wait()
        self._writer.shutdown(wait=True)
        if self._stage is not None:
            self._stage.close()
            self._stage = None

    # --- the end of the run ---------------------------------------------------------------------

    def sparsity(self) -> dict[str, Any]:
        """The same report as :func:`llmprune.report.sparsity_report` on the whole pruned model."""
        out: dict[str, Any] = {
            "overall": self.counts["zeros"] / self.counts["weights"],
            "zeros": self.counts["zeros"], "weights": self.counts["weights"], "layers": self.sparsity_layers,
        }
        if self.pattern is not None and self.pattern.is_nm:
            out["pattern"] = f"{self.pattern.n}:{self.pattern.m}"
            out["nm_valid"] = self.counts["nm_valid"]
        return out

    def finish(self) -> None:
        """Turn the work folder into a checkpoint: final shard names and an index (idempotent, so a run
        killed here finishes on the next try). The resume record stays until :meth:`discard_progress`."""
        from safetensors import safe_open

        self.close()

        names = [OUTSIDE_SHARD] + [_layer_shard(i) for i in range(len(self.view.layers))]
        weight_map: dict[str, str] = {}
        size = 0
        for k, name in enumerate(names, start=1):
            final = self.work / f"model-{k:05d}-of-{len(names):05d}.safetensors"
            if (self.work / name).is_file():
                os.replace(self.work / name, final)
            with safe_open(str(final), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                    weight_map[key] = final.name
            size += final.stat().st_size
        write_json_atomic(self.work / INDEX_NAME, {"metadata": {"total_size": size},
                                                   "weight_map": dict(sorted(weight_map.items()))})
        for pattern in ("hidden-*.pt", "state-*.pt"):
            for path in self.work.glob(pattern):
                path.unlink()

    def discard_progress(self) -> None:
        """The run is complete in the work folder: drop the resume records before it becomes the output."""
        (self.work / OBSERVE_PROGRESS_NAME).unlink(missing_ok=True)
        (self.work / PROGRESS_NAME).unlink()
