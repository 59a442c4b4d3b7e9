"""Zeros counted and written on the bit pattern agree with the float operations, for every dtype."""

from __future__ import annotations

import pytest
import torch

from llmprune.sparsity.bits import count_zeros, nonzero, zero_where_

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def sample(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(64, 48, generator=gen).to(dtype)
    t[torch.rand(64, 48, generator=gen) < 0.3] = 0.0
    t[0, :5] = -0.0  # negative zeros are zeros too
    t[1, 0] = float("nan")
    t[1, 1] = float("-inf")
    t[2, 0] = torch.finfo(dtype).tiny  # the smallest normal number is not zero
    return t


@pytest.mark.parametrize("dtype", DTYPES)
def test_count_zeros_and_nonzero_match_float_comparisons(dtype: torch.dtype) -> None:
    t = sample(dtype)
    assert count_zeros(t) == int((t == 0).sum())
    assert torch.equal(nonzero(t), t != 0)
    view = t.t()  # not contiguous: falls back to the float operations
    assert count_zeros(view) == int((view == 0).sum())
    assert torch.equal(nonzero(view), view != 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_where_matches_masked_fill(dtype: torch.dtype) -> None:
    t = sample(dtype)
    mask = torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    expected = t.masked_fill(mask, 0.0)
    param = torch.nn.Parameter(t.clone())
    zero_where_(param, mask)
    assert torch.equal(param.detach().view(torch.uint8), expected.view(torch.uint8))  # bit-identical, NaN included
    assert param.requires_grad and param.grad is None
    row = t.clone()
    zero_where_(row, mask[0])  # a broadcast mask takes the float path
    assert torch.equal(row.view(torch.uint8), t.masked_fill(mask[0], 0.0).view(torch.uint8))
