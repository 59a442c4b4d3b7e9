"""Counting and writing zeros in weight matrices, and checking tensors for NaN/inf, fast on the CPU.

PyTorch's elementwise kernels for bfloat16/float16 comparisons and ``masked_fill_`` are slow on
CPUs (measured on a 4096 x 11008 bf16 matrix on this project's 2-core machines: ``count_nonzero``
0.21 s, ``masked_fill_`` 0.15 s), which adds up to seconds per 7B layer. Both are done here on the
float's bit pattern instead, viewed as a same-width integer: a float is zero exactly when its bits
without the sign bit are zero, and multiplying the bits by 0/1 writes +0.0 or leaves the value
untouched (0.008 s and 0.07 s). Results are identical to the float operations.

``torch.isfinite(t).all()`` is as slow (0.4 s on that matrix); :func:`all_finite` asks the same of
the minimum and maximum instead (``aminmax`` propagates NaN): 0.016 s.
"""

from __future__ import annotations

import torch
from torch import Tensor

_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: Tensor) -> Tensor | None:
    """``t``'s storage viewed as integers of the same width, or None when that view does not apply."""
    if not t.is_floating_point() or t.element_size() not in _INT_OF_WIDTH or not t.is_contiguous():
        return None
    return t.view(_INT_OF_WIDTH[t.element_size()])


def count_zeros(t: Tensor) -> int:
    """How many entries of ``t`` equal zero (+0.0 or -0.0)."""
    t = t.detach()
    bits = _bits(t)
    if bits is None:
        return t.numel() - int(torch.count_nonzero(t))
    return t.numel() - int(torch.count_nonzero(bits & torch.iinfo(bits.dtype).max))  # no sign bit: -0.0 is zero


def nonzero(t: Tensor) -> Tensor:
    """``t != 0`` as a bool tensor (-0.0 counts as zero)."""
    t = t.detach()
    bits = _bits(t)
    return t != 0 if bits is None else (bits & torch.iinfo(bits.dtype).max) != 0


def zero_where_(t: Tensor, mask: Tensor) -> None:
    """``t[mask] = 0`` in place (+0.0); ``mask`` is bool and broadcastable to ``t``."""
    with torch.no_grad():
        data = t.detach()
        bits = _bits(data)
        mask = mask.to(data.device)
        if bits is None or mask.shape != data.shape:
            data.masked_fill_(mask, 0)
        else:
            bits.mul_(mask.logical_not())


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite (no NaN, no +-inf)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t.detach())  # NaN anywhere makes both NaN
    return bool(torch.isfinite(lo) & torch.isfinite(hi))
