"""obs_solver.sparsegpt_prune (blocked, Cholesky, lazy updates) equals the slow OBS reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmprune.sparsity.obs_solver import inverse_hessian_factor, sparsegpt_prune, sparsegpt_prune_stacked
from llmprune.sparsity.patterns import Pattern
from llmprune.sparsity.select import prune_mask

from .reference.sparsegpt_ref import damped_hessian, elimination_diagonal, sparsegpt_reference

ROWS, COLS, TOKENS = 12, 32, 128


def make_problem(seed: int, dead: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random W (ROWS, COLS), correlated inputs X (TOKENS, COLS) and H = X^T X, all float32."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(ROWS, COLS, generator=gen)
    mixing = torch.eye(COLS) + torch.randn(COLS, COLS, generator=gen) / COLS**0.5
    x = torch.randn(TOKENS, COLS, generator=gen) @ mixing
    x[:, list(dead)] = 0.0
    return weight, x, x.t() @ x


def run_both(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, block_size: int):
    new_w, mask = sparsegpt_prune(weight, hessian, pattern, block_size=block_size, damp=0.01)
    ref_w, ref_mask = sparsegpt_reference(
        weight.double().numpy(), hessian.double().numpy(), sparsity=pattern.sparsity,
        n=pattern.n, m=pattern.m, scope=pattern.scope, block_size=block_size, damp=0.01,
    )
    return new_w, mask, torch.from_numpy(ref_w), torch.from_numpy(ref_mask)


PATTERNS = [
    Pattern(0.5, scope="matrix"),
    Pattern(0.3, scope="matrix"),
    Pattern(0.5, scope="row"),
    Pattern(0.37, scope="row"),
    Pattern(0.5, n=2, m=4),
    Pattern(0.75, n=1, m=4),
    Pattern(0.5, n=4, m=8),
]


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_solver_equals_reference(pattern: Pattern, block_size: int, seed: int) -> None:
    weight, _, hessian = make_problem(seed)
    new_w, mask, ref_w, ref_mask = run_both(weight, hessian, pattern, block_size)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert torch.equal(mask, ref_mask)
    assert torch.all(new_w[mask] == 0)
    scale = float(weight.abs().max())
    torch.testing.assert_close(new_w.double(), ref_w, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("pattern", [Pattern(0.5, scope="matrix"), Pattern(0.4, scope="row")], ids=str)
def test_solver_equals_reference_with_partial_last_block(pattern: Pattern) -> None:
    weight, _, hessian = make_problem(2)
    new_w, mask, ref_w, ref_mask = run_both(weight, hessian, pattern, block_size=12)  # blocks 12, 12, 8
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(new_w.double(), ref_w, rtol=1e-4, atol=1e-4 * float(weight.abs().max()))


@pytest.mark.parametrize("pattern", [Pattern(0.5, scope="matrix"), Pattern(0.5, n=2, m=4)], ids=str)
def test_solver_equals_reference_with_dead_columns(pattern: Pattern) -> None:
    weight, _, hessian = make_problem(3, dead=(0, 5, 17))
    assert float(hessian[5, 5]) == 0.0
    new_w, mask, ref_w, ref_mask = run_both(weight, hessian, pattern, block_size=16)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(new_w.double(), ref_w, rtol=1e-4, atol=1e-4 * float(weight.abs().max()))


def test_elimination_diagonal_is_squared_cholesky_diagonal_of_inverse() -> None:
    """[U_jj]^2 (U upper Cholesky of H^-1) is the OBS denominator Hinv_jj at column j's elimination."""
    _, _, hessian = make_problem(4, dead=(3,))
    u = inverse_hessian_factor(hessian, 0.01).double()
    d = elimination_diagonal(damped_hessian(hessian.double().numpy(), 0.01))
    np.testing.assert_allclose(torch.diagonal(u).numpy() ** 2, d, rtol=1e-4)


@pytest.mark.parametrize("pattern", [Pattern(0.5, scope="matrix"), Pattern(0.5, scope="row"),
                                     Pattern(0.5, n=2, m=4)], ids=str)
def test_reconstruction_reduces_output_error(pattern: Pattern) -> None:
    weight, x, hessian = make_problem(5)
    new_w, mask = sparsegpt_prune(weight, hessian, pattern, block_size=16)
    dense_out = weight @ x.t()
    err_reconstructed = torch.linalg.norm(dense_out - new_w @ x.t())
    err_zeroed = torch.linalg.norm(dense_out - weight.masked_fill(mask, 0.0) @ x.t())
    assert err_reconstructed < 0.9 * err_zeroed


def test_nm_with_block_size_not_multiple_of_m_keeps_n_per_group() -> None:
    weight, _, hessian = make_problem(6)
    _, mask = sparsegpt_prune(weight, hessian, Pattern(0.5, n=2, m=4), block_size=6)
    assert torch.all(mask.reshape(ROWS, COLS // 4, 4).sum(-1) == 2)


def test_matrix_scope_count_matches_prune_mask() -> None:
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(3, 10, generator=gen)
    x = torch.randn(64, 10, generator=gen)
    pattern = Pattern(0.7, scope="matrix")
    _, mask = sparsegpt_prune(weight, x.t() @ x, pattern, block_size=10)
    assert int(mask.sum()) == int(prune_mask(weight.abs(), pattern).sum()) == 21  # floor(30 * 0.7)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_a_fixed_mask_reproduces_the_solver_s_own_choice(pattern: Pattern) -> None:
    weight, _, hessian = make_problem(3)
    new_w, mask = sparsegpt_prune(weight, hessian, pattern, block_size=16)
    again, same = sparsegpt_prune(weight, hessian, Pattern(0.9), block_size=16, mask=mask)  # pattern not consulted
    assert torch.equal(same, mask)
    assert torch.equal(again, new_w)  # the same eliminations in the same order: bit for bit


@pytest.mark.parametrize("block_size", [8, 32])
def test_a_fixed_mask_is_reconstructed_as_the_reference_does(block_size: int) -> None:
    weight, x, hessian = make_problem(4)
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(weight.shape, generator=gen) < 0.45  # any mask, not one the solver would pick
    new_w, same = sparsegpt_prune(weight, hessian, Pattern(0.5), block_size=block_size, mask=mask)
    ref_w, _ = sparsegpt_reference(weight.double().numpy(), hessian.double().numpy(), block_size=block_size,
                                   damp=0.01, fixed_mask=mask.numpy())
    assert torch.equal(same, mask) and torch.all(new_w[mask] == 0)
    scale = float(weight.abs().max())
    torch.testing.assert_close(new_w.double(), torch.from_numpy(ref_w), rtol=1e-4, atol=1e-4 * scale)
    # The reconstruction lowers the layer's output error against keeping the dense values.
    masked = weight.masked_fill(mask, 0.0)
    assert float(((new_w - weight) @ x.t()).pow(2).sum()) < 0.9 * float(((masked - weight) @ x.t()).pow(2).sum())
    with pytest.raises(ValueError, match="mask must be bool"):
        sparsegpt_prune(weight, hessian, Pattern(0.5), mask=mask.float())


@pytest.mark.parametrize("fixed", [False, True], ids=["chosen", "fixed-mask"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_weights_sharing_an_input_stacked_equal_one_by_one(pattern: Pattern, fixed: bool) -> None:
    """q/k/v (or gate/up) share one Hessian: solved as one matrix of stacked rows where rows are
    independent, one by one for scope="matrix"; either way exactly what separate calls give."""
    _, _, hessian = make_problem(8)
    gen = torch.Generator().manual_seed(9)
    weights = [torch.randn(rows, COLS, generator=gen) for rows in (12, 4, 7)]
    masks = [torch.rand(w.shape, generator=gen) < 0.4 for w in weights] if fixed else None
    before = [w.clone() for w in weights]
    stacked = list(sparsegpt_prune_stacked(weights, hessian, pattern, block_size=16, masks=masks))
    assert len(stacked) == len(weights)
    assert all(torch.equal(w, b) for w, b in zip(weights, before, strict=True))  # the inputs untouched
    for i, (w, (new_w, mask)) in enumerate(zip(weights, stacked, strict=True)):
        alone_w, alone_mask = sparsegpt_prune(w, hessian, pattern, block_size=16,
                                              mask=None if masks is None else masks[i])
        assert new_w.shape == w.shape and torch.equal(mask, alone_mask), i
        assert torch.equal(new_w, alone_w), i
    with pytest.raises(ValueError, match="one mask per weight"):
        sparsegpt_prune_stacked(weights, hessian, pattern, masks=[torch.zeros(12, COLS, dtype=torch.bool)])
    with pytest.raises(ValueError, match="factor must be"):
        sparsegpt_prune(weights[0], hessian, pattern, factor=torch.eye(COLS - 1))
