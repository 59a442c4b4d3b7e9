"""Read a safetensors checkpoint tensor by tensor, write shards, and build a model without allocating weights.

Used by streaming (:mod:`llmprune.engine.streaming`): the model is built on the meta device, only
the modules outside the decoder layers are materialised, and each decoder layer is loaded from the
shards just before it is pruned.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LLMPruneError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_TORCH_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                      torch.float8_e5m2: "F8_E5M2"}
_TORCH_DTYPES = {name: dtype for dtype, name in _TORCH_DTYPE_NAMES.items()}
_DTYPE_BYTES = {name: dtype.itemsize for dtype, name in _TORCH_DTYPE_NAMES.items()}

# safetensors' Dtype order (its Rust enum); save_file writes tensors in reverse of it, then by name
_WRITE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"]


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str],
                      metadata: dict[str, str] | None = None, stage: mmap.mmap | None = None) -> None:
    """Write ``tensors`` (CPU) to ``path`` in the safetensors format, straight from their memory.

    ``safetensors.torch.save_file`` first builds the whole file in one growing buffer; for a 7B
    layer (0.4 GB) that is a second copy of the layer, grown by reallocation, which cost 0.3-0.9 s
    per layer on this project's 2-core machines. This writes the header, then each tensor's bytes
    with one ``write`` (no copy, and the GIL is released while the kernel copies). The layout is
    the format's: a little-endian u64 header length, the JSON header padded with spaces to a
    multiple of 8, then the data, tensors in safetensors' own order (by dtype, widest first, then
    name), so the file is byte-identical to ``save_file``'s. Readers: any safetensors reader.
    """
    for name, t in tensors.items():
        if t.dtype not in _TORCH_DTYPE_NAMES:
            raise LLMPruneError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store")
    items = sorted(tensors.items(), key=lambda kv: (-_WRITE_ORDER.index(_TORCH_DTYPE_NAMES[kv[1].dtype]), kv[0]))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, t in items:
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _TORCH_DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    parts = [len(raw).to_bytes(8, "little"), raw]
    parts += [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data for _, t in items if t.numel()]
    if offset < _DIRECT_MIN_BYTES or not _write_direct(path, parts, stage):
        with open(path, "wb") as fh:
            for part in parts:
                fh.write(part)


_DIRECT_MIN_BYTES = 16 << 20  # smaller files: the page cache's overhead does not matter
_DIRECT_CHUNK = 32 << 20  # staging buffer of the direct writer
_DIRECT_ALIGN = 4096  # O_DIRECT wants buffer address, file offset and length in multiples of the block size


def staging_buffer() -> mmap.mmap:
    """A page-aligned buffer for :func:`write_safetensors`'s direct writes, to reuse across files
    (each new one is faulted in again: 8192 page faults for every file written)."""
    return mmap.mmap(-1, _DIRECT_CHUNK)  # anonymous maps are page-aligned


def _write_direct(path: str | os.PathLike[str], parts: list[Any], stage: mmap.mmap | None = None) -> bool:
    """Write the concatenation of ``parts`` (bytes-like) to ``path`` with ``O_DIRECT``; False where
    the system or file system does not offer it (the caller then writes the whole file again).

    Buffered writes of a 7B model's shards cost more CPU than the pruning around them on this
    project's virtual machines: ``dd`` of 2 GB took 5.1 s (all of it system time) through the page
    cache against 1.3 s (0.3 s system time) with ``O_DIRECT``. The data goes through one reused,
    page-aligned staging buffer (``stage``, or one made for this file); the last block is padded and
    the file truncated to its length.
    """
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | direct, 0o644)
    except OSError:
        return False
    own = stage is None
    stage = staging_buffer() if stage is None else stage
    view = memoryview(stage)
    fill = total = 0

    def flush(length: int) -> None:
        done = 0
        while done < length:
            done += os.write(fd, view[done:length])

    try:
        for part in parts:
            part = memoryview(part).cast("B")
            pos = 0
            while pos < len(part):
                n = min(_DIRECT_CHUNK - fill, len(part) - pos)
                view[fill:fill + n] = part[pos:pos + n]
                fill, pos, total = fill + n, pos + n, total + n
                if fill == _DIRECT_CHUNK:
                    flush(fill)
                    fill = 0
        if fill:
            padded = -(-fill // _DIRECT_ALIGN) * _DIRECT_ALIGN
            view[fill:padded] = bytes(padded - fill)
            flush(padded)
        os.ftruncate(fd, total)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a real failure (disk full ...): the caller's error handling
            raise
        os.close(fd)
        fd = -1
        return False  # this file system refuses direct writes of this shape: write buffered instead
    finally:
        if fd >= 0:
            os.close(fd)
        view.release()
        if own:
            stage.close()
    return True


class BufferPool:
    """Tensors nothing else uses any more, handed out again as read buffers of the same shape and dtype.

    A streamed run reads every decoder layer into new memory. Layers of one model have the same
    shapes, so the tensors of a layer already written to disk can hold the next layer read: the
    reads then land in pages already faulted in, instead of growing (and fragmenting) the heap by
    a layer every step. Measured on the 7B layout, 6 layers: each fresh read faulted in 80% of the
    layer's 0.4 GB again, at several seconds of system time per run on these virtual machines.

    :meth:`give` keeps a tensor only if nothing else can reach its memory (no other Python reference
    to it, no other tensor on its storage), so a buffer handed out again is never visible to
    anyone else. Thread-safe: the streaming writer thread gives, the main thread takes.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, shape: Iterable[int], dtype: torch.dtype) -> torch.Tensor | None:
        with self._lock:
            free = self._free.get((tuple(shape), dtype))
            return free.pop() if free else None

    def give(self, tensors: list[torch.Tensor]) -> None:
        """Keep the tensors of ``tensors`` (emptied by this call) that nothing else uses."""
        while tensors:
            t = tensors.pop()
            if _unshared(t):
                with self._lock:
                    self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)
            del t

    def clear(self) -> None:
        with self._lock:
            self._free.clear()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(t.nbytes for free in self._free.values() for t in free)


_storage_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)


def _unshared(t: torch.Tensor) -> bool:
    """Whether the caller's one reference to ``t`` is the only way to its memory (False when unsure).

    Counts: the caller's variable plus ``getrefcount``'s own argument; on the storage, ``t`` plus the
    temporary storage object made here. PyTorch exposes the storage count only privately; without it
    nothing is recycled.
    """
    if _storage_use_count is None or t.device.type != "cpu" or not t.is_contiguous() or t.storage_offset():
        return False
    storage = t.untyped_storage()
    return (sys.getrefcount(t) <= 3 and storage.nbytes() == t.nbytes  # give's variable, our argument, getrefcount's
            and _storage_use_count(storage._cdata) == 2)


def _read_tensors(fh: Any, names: list[str], pool: BufferPool | None = None) -> dict[str, torch.Tensor]:
    """``names`` from the open safetensors file ``fh`` (unbuffered), each read into a new tensor (or
    one of ``pool``'s)."""
    size = int.from_bytes(fh.read(8), "little")
    header = json.loads(fh.read(size))
    out: dict[str, torch.Tensor] = {}
    for key in names:
        info = header[key]
        dtype = _TORCH_DTYPES[info["dtype"]]
        t = pool.take(info["shape"], dtype) if pool is not None else None
        if t is None:
            t = torch.empty(info["shape"], dtype=dtype)
        begin, end = info["data_offsets"]
        if end - begin != t.numel() * t.element_size():
            raise ValueError(f"{key} holds {end - begin} bytes for shape {info['shape']} {info['dtype']}")
        buf = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        fh.seek(8 + size + begin)
        done = 0
        while done < len(buf):  # one read returns at most ~2 GB on Linux
            n = fh.readinto(buf[done:])
            if not n:
                raise ValueError(f"the file ends inside {key}")
            done += n
        out[key] = t
    return out


@dataclass
class TensorInfo:
    file: str
    dtype: str  # safetensors dtype name (F32, BF16 ...)
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("F", "BF"))


@dataclass
class ShardReader:
    """The tensors of a safetensors checkpoint folder (one file or sharded with an index), checked up front.

    Every shard is opened once when the reader is built: a missing file, an unreadable header, or a
    key the index names but the shard lacks fails here, naming the file, before any work is done.
    """

    folder: Path
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | Path) -> ShardReader:
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise LLMPruneError(f"{index} is not a safetensors index ({exc!r})") from None
        elif (folder / SINGLE_NAME).is_file():
            weight_map = {}
        else:
            raise LLMPruneError(f"{folder} has no {SINGLE_NAME} or {INDEX_NAME}; streaming reads safetensors "
                                f"checkpoints only")
        files = sorted(set(weight_map.values())) or [SINGLE_NAME]
        reader = cls(folder)
        for name in files:
            path = folder / name
            if not path.is_file():
                raise LLMPruneError(f"shard {path} named in {INDEX_NAME} is missing; the checkpoint is incomplete")
            try:
                with safe_open(str(path), framework="pt") as fh:
                    for key in fh.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                        sl = fh.get_slice(key)
                        reader.tensors[key] = TensorInfo(name, sl.get_dtype(), tuple(sl.get_shape()))
            except Exception as exc:  # safetensors raises its own error types for corrupt files
                raise LLMPruneError(f"shard {path} cannot be read ({exc}); the checkpoint is corrupt") from None
        wrong = [k for k, f in weight_map.items() if reader.tensors.get(k) is None or reader.tensors[k].file != f]
        if wrong:
            raise LLMPruneError(f"{index}: {len(wrong)} tensor(s) are not in the shard the index names, e.g. "
                                f"{wrong[0]} in {weight_map[wrong[0]]}; the checkpoint is corrupt")
        return reader

    def load(self, keys: list[str], pool: BufferPool | None = None) -> dict[str, torch.Tensor]:
        """The named tensors, read from their shards into memory of their own (each shard opened once),
        or into ``pool``'s buffers where it has one of the same shape and dtype.

        Read with plain ``readinto`` rather than safetensors' memory map: a tensor of the map is a
        copy-on-write view of the file, so pruning it in place faults page by page (0.13 s for a
        bf16 4096 x 11008 matrix here, measured), and copying it out faults on the map's side too;
        one read into a tensor allocated here is a single kernel copy.
        """
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.tensors[key].file, []).append(key)
        out: dict[str, torch.Tensor] = {}
        for name, names in by_file.items():
            path = self.folder / name
            try:
                with open(path, "rb", buffering=0) as fh:
                    out.update(_read_tensors(fh, names, pool))
            except (OSError, ValueError, KeyError) as exc:
                raise LLMPruneError(f"shard {path} cannot be read ({exc}); the checkpoint is corrupt") from None
        return out

    def with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self.tensors if k.startswith(prefix)]

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this checkpoint's contents cheaply (names, shapes, dtypes, file sizes)."""
        files = sorted({t.file for t in self.tensors.values()})
        return {
            "files": {f: (self.folder / f).stat().st_size for f in files},
            "tensors": {k: [t.dtype, list(t.shape)] for k, t in sorted(self.tensors.items())},
        }


def tensor_bytes(info: TensorInfo, dtype: torch.dtype) -> int:
    """Bytes of a tensor once cast to ``dtype`` (floating tensors only are cast)."""
    size = torch.tensor([], dtype=dtype).element_size() if info.is_float else _DTYPE_BYTES.get(info.dtype, 4)
    return info.numel * size


def empty_model(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The model of ``folder``'s config with every parameter on the meta device (no memory, no init).

    Buffers (rotary frequency tables, ...) are real: they are computed, not stored in checkpoints.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_config leaves tied embeddings as two meta tensors; count and load them as one
    return model.eval()


def assign_tensors(module: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Replace ``module``'s parameters/buffers named in ``tensors`` (relative names) by those tensors.

    Floating tensors are cast to ``dtype``, as ``from_pretrained(dtype=...)`` does.
    """
    for name, value in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        value = value.to(dtype) if value.is_floating_point() else value
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = value
        else:
            raise LLMPruneError(f"the checkpoint holds {name}, which the model built from its config does not have")


class CheckpointLayout:
    """The names a checkpoint stores its tensors under, mapped to the model's parameters as
    ``from_pretrained`` maps them, and back as ``save_pretrained`` writes them.

    transformers 5 converts some checkpoints while loading (its conversion mapping): Mixture-of-Experts
    checkpoints store one matrix per expert (``mlp.experts.3.gate_proj.weight``, Mixtral's
    ``block_sparse_moe.experts.3.w1.weight``), which load as the fused 3-D parameters of the model
    (``mlp.experts.gate_up_proj`` [E, 2I, H]); ``save_pretrained`` writes them per expert again. A
    streamed run reads a layer's tensors through the same conversion (transformers' own weight
    converters, never a copy of them) and writes the layer back through its reverse, so the streamed
    output has the names and shapes an in-memory run saves. A checkpoint without conversions maps
    every name to itself.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.model = model
        self.groups: dict[str, list[tuple[str, str | None]]] = {}  # model name -> [(checkpoint name, pattern)]
        self._converters: dict[str, Any] = {}
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key
        except ImportError:  # a transformers without conversion mappings: names are the model's
            self.groups = {n: [(n, None)] for n in names}
            self.identity = True
            return
        mapping = get_model_conversion_mapping(model)
        converters = [c for c in mapping if isinstance(c, WeightConverter)]
        renamings = [c for c in mapping if not isinstance(c, WeightConverter)]
        self._converters = {p: c for c in converters for p in c.source_patterns}
        meta = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)
        for key in sorted(names, key=dot_natural_key):  # experts in order, as from_pretrained stacks them
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if renamed not in meta and key in meta:
                renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
            self.groups.setdefault(renamed, []).append((key, pattern))
        # What save_pretrained reverts: the conversions this checkpoint used (as from_pretrained records them).
        model._weight_conversions = [c for c in mapping if c.was_used()]  # type: ignore[assignment]
        self.identity = all(len(src) == 1 and src[0] == (name, None) for name, src in self.groups.items())

    def names(self, prefix: str = "", inside: bool = True) -> list[str]:
        """The model names (of the first tensor of each conversion) that start with ``prefix``, or with
        ``inside=False`` those that do not."""
        return [n for n in self.groups if n.startswith(prefix) == inside]

    def load(self, reader: ShardReader, names: list[str], pool: BufferPool | None = None) -> dict[str, torch.Tensor]:
        """The model's tensors ``names`` (see :meth:`names`), read from ``reader`` and converted.

        Tensors stored as they are go through ``pool``; each converted group (e.g. the experts of one
        projection) is read, converted and released before the next, so the extra memory is one
        projection's worth, not a layer's."""
        plain = [n for n in names if self.groups[n][0][1] is None]
        stored = reader.load([self.groups[n][0][0] for n in plain], pool)
        out = {n: stored[self.groups[n][0][0]] for n in plain}
        del stored
        if pool is not None and len(plain) < len(names):
            pool.clear()  # the previous layer's buffers do not fit converted tensors: free them first
        for name in names:
            if self.groups[name][0][1] is not None:
                out.update(self._convert(name, reader.load([key for key, _ in self.groups[name]])))
        return out

    def convert(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A whole checkpoint's ``tensors`` (by checkpoint name), under the model's names."""
        out: dict[str, torch.Tensor] = {}
        for name, sources in self.groups.items():
            if sources[0][1] is None:
                out[name] = tensors[sources[0][0]]
            else:
                out.update(self._convert(name, {key: tensors[key] for key, _ in sources}))
        return out

    def _convert(self, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model tensors of the conversion whose first target is ``name``, from its checkpoint tensors."""
        from copy import deepcopy

        sources = self.groups[name]
        converter = deepcopy(self._converters[sources[0][1]])
        for key, pattern in sources:
            converter.add_tensor(name, key, pattern, tensors.pop(key))
        return {target: value[0] if isinstance(value, list) else value
                for target, value in converter.convert(name, model=self.model, config=self.model.config).items()}

    def revert(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` (model names, full) under the checkpoint's names and layout, as ``save_pretrained``
        writes them."""
        if self.identity:
            return tensors
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, tensors)
