"""Check a ``.gguf`` file before anything converts it, and read what the plan line needs from it.

transformers' GGUF loader meets a file that is not GGUF, of an unknown version or cut short with a
deep traceback (or a numpy reshape error). Here the header is read by hand (magic, version), the
tensor table through the ``gguf`` package's reader, and every tensor's data is checked to lie
inside the file: a truncated download is named as such, with its expected and actual size.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LLMPruneError

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str | None
    layers: int | None
    context_length: int | None
    tensors: int


# GGUF metadata value types: 0-7 and 10-12 are fixed-size scalars, 8 a string, 9 an array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


class _Cursor:
    """Little-endian reads from a memory-mapped file; reading past its end raises :class:`_Truncated`."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Truncated
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALAR:
            return self.unpack(_SCALAR[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _SCALAR:  # skipped, not decoded: token scores and types can hold 100k+ entries
                self.take(count * struct.calcsize(_SCALAR[item]))
                return None
            if item == _STRING:
                for _ in range(count):
                    self.take(self.unpack("<Q"))
                return None
            if item == _ARRAY:
                for _ in range(count):
                    self.value(_ARRAY)
                return None
        raise ValueError(f"unknown metadata value type {kind} at byte {self.pos}")


def check_gguf(path: str | Path) -> GGUFInfo:
    """Raise :class:`LLMPruneError` unless ``path`` is a complete GGUF file of a version we read."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8 or head[:4] != _MAGIC:
            raise LLMPruneError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); "
                                f"pass a .gguf model file, a model folder or a Hub id")
        version = struct.unpack("<I", head[4:8])[0]
        if version not in _VERSIONS:
            raise LLMPruneError(f"{path} is GGUF version {version}; llmprune reads versions "
                                f"{', '.join(map(str, _VERSIONS))} (convert it again with a current llama.cpp)")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                meta, tensors, data_start = _read_tables(_Cursor(buf))
            except _Truncated:
                raise LLMPruneError(f"{path} is truncated: it ends inside its header ({size:,} bytes). "
                                    f"Download or convert it again") from None
            except (ValueError, struct.error, OverflowError) as exc:
                raise LLMPruneError(f"{path} is a damaged GGUF file ({exc}). Download or convert it again") from None
    if not tensors:
        raise LLMPruneError(f"{path} holds no tensors; it is not a model file")
    from gguf.constants import GGML_QUANT_SIZES  # (elements per block, bytes per block) of each tensor type

    end = 0
    for name, dims, kind, offset in tensors:
        if kind not in GGML_QUANT_SIZES:
            raise LLMPruneError(f"{path}: tensor {name} has unknown type {kind}; the file is damaged or too new")
        block, nbytes = GGML_QUANT_SIZES[kind]
        end = max(end, data_start + offset + math.prod(dims) * nbytes // block)
    if end > size:
        raise LLMPruneError(f"{path} is truncated: its tensor table needs {end:,} bytes, the file has {size:,}. "
                            f"Download or convert it again")
    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    layers = meta.get(f"{arch}.block_count") if arch else None
    context = meta.get(f"{arch}.context_length") if arch else None
    return GGUFInfo(arch, layers if isinstance(layers, int) else None,
                    context if isinstance(context, int) else None, len(tensors))


def _read_tables(cur: _Cursor) -> tuple[dict[str, Any], list[tuple[str, list[int], int, int]], int]:
    cur.take(8)
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.unpack("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if n_dims > 8:
            raise ValueError(f"tensor {name} claims {n_dims} dimensions")
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        tensors.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
    align = meta.get("general.alignment") or 32
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise ValueError(f"invalid alignment {align!r}")
    return meta, tensors, -(-cur.pos // align) * align
