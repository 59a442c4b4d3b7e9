"""Large allocations from the heap during a layer-wise run, handed back to the system between layers.

A layer step allocates and frees many large temporaries: float32 score copies, masks, statistics,
the activations of a layer's MLP (4096 tokens x 11008 x bf16 = 90 MB for a 7B layer). glibc serves
every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and returns it with
``munmap``, so every such temporary is paid again in page faults. Measured on this project's 2-core
machines: a fresh float32 copy of a bf16 4096 x 11008 matrix 42-47 ms, the same copy into reused
memory 4-7 ms. In streamed Wanda runs of 4 layers of 7B widths (``sequential=linear``), the layer
steps took 4.6-6.0 s with plain ``mmap`` and 2.9-4.3 s with the heap set up for the whole process
(two runs each).

:func:`heap_allocations` turns ``mmap`` off for the duration of a run (``mallopt(M_MMAP_MAX, 0)``)
and keeps freed memory in the heap (``M_TRIM_THRESHOLD``), so temporaries reuse pages already
faulted in; :meth:`Heap.trim` (called after every layer) gives the free pages back to the system
(``malloc_trim(0)``) once resident memory grew :data:`FREE_BUDGET` past what it was after the last
return, so memory stays bounded by a layer's working set plus that budget. Leaving the block
restores glibc's defaults and returns the free pages.

Alternatives measured and not taken: PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (2 MB pages for its
allocations) must be set before torch is imported and was erratic on these virtual machines (the
same 180 MB copy took 11 to 200 ms); a buffer pool only covers our own temporaries, not the
model's activations.

Only glibc has these calls; elsewhere (macOS, musl) this does nothing. ``LLMPRUNE_MALLOC=default``
turns it off. Results are identical either way: only where memory comes from changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import LLMPruneError

ENV = "LLMPRUNE_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, <malloc.h>
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's defaults
_KEEP_FREED = 2**31 - 1  # trim threshold while active: never trim on free, only in Heap.trim
# Growth of resident memory tolerated between returns of free pages: the next layer reuses freed
# memory without faulting it in again. Returning it after every layer made every layer fault its
# working set in again: the 4-layer run above took 18.9 s with a return after every layer, 14.0 s
# with none (single runs under cProfile, on a noisy machine); the budget bounds memory between the two.
FREE_BUDGET = 1 << 30
WARMUP = 2  # layers whose resident memory sets the mark the budget is counted from


def _rss_bytes() -> int | None:
    """This process's resident set size now (Linux ``/proc/self/statm``), None where unknown."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Heap:
    """What :func:`heap_allocations` yields: ``trim()`` between layers, ``policy`` for run reports."""

    def __init__(self, libc: ctypes.CDLL | None) -> None:
        self._libc = libc
        self._checks = 0
        self._high = 0  # resident memory of the warm-up layers, or what was left in use after a return
        self.trims = 0
        self.policy = (f"glibc heap (mmap off; freed pages returned once resident memory exceeds the first "
                       f"{WARMUP} layers' by {FREE_BUDGET >> 20} MB)" if libc is not None else "system default")

    def trim(self, force: bool = False) -> None:
        """Give the heap's free pages back to the system (``malloc_trim(0)``) when resident memory
        exceeds the mark by more than :data:`FREE_BUDGET` (always with ``force``).

        The mark is the most resident memory seen after the first :data:`WARMUP` layers (by then
        a streamed run holds everything it holds in its steady state: a layer being written, one
        being pruned, their buffers); later it only rises to what is still in use right after a
        return. So layers that need the same working set reuse it without faulting it in again,
        and memory that keeps growing (fragmentation of the heap) is returned once it exceeds the
        budget: memory stays bounded by the warm-up's plus the budget, unless more is truly in use.
        """
        if self._libc is None:
            return
        rss = _rss_bytes()
        self._checks += 1
        if force or rss is None or (self._checks > WARMUP and rss > self._high + FREE_BUDGET):
            self._libc.malloc_trim(0)
            self.trims += 1
            rss = _rss_bytes()  # what is left in use after returning the free pages
            self._high = max(self._high, rss or 0)
        elif self._checks <= WARMUP:
            self._high = max(self._high, rss)


_depth = 0  # nested runs (e.g. a sweep's) share the outermost block's setting


def _glibc() -> ctypes.CDLL | None:
    setting = os.environ.get(ENV, "heap")
    if setting not in ("heap", "default"):
        raise LLMPruneError(f"{ENV}={setting!r} is not a setting; use {ENV}=heap (the default: large allocations "
                            f"from the heap during a run) or {ENV}=default (the system allocator's behaviour)")
    if setting == "default" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextmanager
def heap_allocations() -> Iterator[Heap]:
    """Serve large allocations from the heap inside the block (see the module's docstring)."""
    global _depth
    libc = _glibc()
    heap = Heap(libc)
    if libc is None:
        yield heap
        return
    if _depth == 0:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED)
    _depth += 1
    try:
        yield heap
    finally:
        _depth -= 1
        if _depth == 0:
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            heap.trim(force=True)


def malloc_policy() -> str:
    """The policy :func:`heap_allocations` applies on this system, for run reports."""
    return Heap(_glibc()).policy
