"""The exact fixed-mask reconstruction: one least-squares problem per row, by conjugate gradients
(the default) and by the direct Cholesky solve, against float64 references and SparseGPT's OBS
updates for the same mask."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from llmprune.sparsity import exact_solver
from llmprune.sparsity.exact_solver import damped_hessian, masked_least_squares
from llmprune.sparsity.obs_solver import sparsegpt_prune
from llmprune.sparsity.patterns import Pattern


def problem(rows: int = 24, cols: int = 40, tokens: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense weights and the Hessian of correlated inputs, one of them always zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3 \
        + torch.randn(tokens, cols, generator=g)
    x[:, 3] = 0.0
    return torch.randn(rows, cols, generator=g), x.T @ x


def error(w: torch.Tensor, w0: torch.Tensor, h: torch.Tensor) -> float:
    """The damped objective both solvers minimize: sum over rows of (w - w0) H (w - w0)^T."""
    d = (w - w0).double()
    return float(torch.einsum("ri,ij,rj->", d, damped_hessian(h, 0.01)[0].double(), d))


def reference(w0: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row by row in float64: the kept weights solve H_KK w_K = (H w0)_K."""
    hd = damped_hessian(h, 0.01)[0].double()
    out = torch.zeros_like(w0, dtype=torch.float64)
    for r in range(w0.shape[0]):
        keep = torch.nonzero(~mask[r]).flatten()
        if keep.numel():
            out[r, keep] = torch.linalg.solve(hd[keep][:, keep], (hd @ w0[r].double())[keep])
    return out


def mixed_mask(w0: torch.Tensor) -> torch.Tensor:
    """Rows of every kept count, one keeping everything and one keeping nothing."""
    mask = torch.rand(w0.shape, generator=torch.Generator().manual_seed(1)) < torch.linspace(0, 1, w0.shape[0])[:, None]
    mask[0] = False
    mask[-1] = True
    return mask


@pytest.mark.parametrize(("method", "chunk_bytes"), [("cholesky", 1), ("cholesky", 4 * 20 * 20 * 3),
                                                     ("cholesky", 2**28), ("cg", 4 * 40 * 5), ("cg", 2**28)])
def test_matches_a_float64_row_by_row_solve_for_rows_of_different_counts(
        method: str, chunk_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """cg: ``chunk_bytes`` stands for its chunk of rows (5 rows at a time, or all at once)."""
    if method == "cg":
        monkeypatch.setattr(exact_solver, "CG_CHUNK_BYTES", chunk_bytes)
    w0, h = problem()
    mask = mixed_mask(w0)
    w = masked_least_squares(w0, h, mask, method=method, chunk_bytes=chunk_bytes)  # type: ignore[arg-type]
    assert w.dtype == torch.float32 and bool((w[mask] == 0).all())
    torch.testing.assert_close(w.double(), reference(w0, h, mask), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w[0], w0[0], rtol=1e-4, atol=1e-4)  # a row that keeps everything is itself


def test_conjugate_gradients_reach_the_direct_solution_on_ill_conditioned_inputs() -> None:
    """Inputs whose scales span four orders of magnitude (like LLM activations with outlier channels):
    the iteration must not stop early; its error is the float64 optimum's to 1e-6, as the direct one."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 96, generator=g) @ torch.randn(96, 96, generator=g) * torch.logspace(-2, 2, 96)
    w0, h = torch.randn(48, 96, generator=g), x.T @ x
    for mask in (mixed_mask(w0), torch.arange(96).repeat(48, 1) % 4 < 2):
        best = error(reference(w0, h, mask).float(), w0, h)
        for method in ("cg", "cholesky"):
            w = masked_least_squares(w0, h, mask, method=method)  # type: ignore[arg-type]
            assert error(w, w0, h) <= best * (1 + 1e-6), method


def test_conjugate_gradients_fall_back_to_the_direct_solve_when_they_do_not_converge(
        caplog: pytest.LogCaptureFixture) -> None:
    w0, h = problem()
    mask = mixed_mask(w0)
    with caplog.at_level(logging.INFO, logger="llmprune.sparsity.exact_solver"):
        w = masked_least_squares(w0, h, mask, max_iter=1)
    assert "did not converge in 1 steps" in caplog.text
    torch.testing.assert_close(w, masked_least_squares(w0, h, mask, method="cholesky"))


def test_beyond_the_direct_solves_bound_an_unconverged_iterate_is_kept(caplog: pytest.LogCaptureFixture,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """At 7B widths the direct fallback would take hours: past ``DIRECT_FALLBACK_FLOPS`` the conjugate
    gradients' iterate is kept, its error already below SparseGPT's for the mask."""
    w0, h = problem()
    mask = mixed_mask(w0)
    monkeypatch.setattr(exact_solver, "DIRECT_FALLBACK_FLOPS", 0.0)
    with caplog.at_level(logging.INFO, logger="llmprune.sparsity.exact_solver"):
        w = masked_least_squares(w0, h, mask, max_iter=2)
    assert "keeping their iterate" in caplog.text
    obs, _ = sparsegpt_prune(w0, h, Pattern(0.0), mask=mask)
    assert torch.equal(w == 0, mask | (w0 == 0))
    assert error(w, w0, h) < error(obs, w0, h)
    assert error(w, w0, h) > error(reference(w0, h, mask).float(), w0, h)


@pytest.mark.parametrize("method", ["cg", "cholesky"])
@pytest.mark.parametrize("pattern", [Pattern(0.5, n=2, m=4), Pattern(0.5), Pattern(0.7, scope="matrix")], ids=str)
def test_never_a_larger_error_than_sparsegpt_for_the_same_mask(pattern: Pattern, method: str) -> None:
    for seed in range(3):
        w0, h = problem(seed=seed)
        w_sgpt, mask = sparsegpt_prune(w0, h, pattern)
        w = masked_least_squares(w0, h, mask, method=method)  # type: ignore[arg-type]
        assert bool((w[mask] == 0).all())
        assert error(w, w0, h) < error(w_sgpt, w0, h) * 0.999, seed  # strictly lower on correlated inputs


def test_a_singular_system_is_retried_with_more_dampening() -> None:
    """Without dampening, inputs that are copies of each other make kept-weight systems singular."""
    w0, h = problem(cols=16)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(2)).repeat(1, 4)  # rank 4, 16 columns
    mask = torch.zeros(w0.shape[0], 16, dtype=torch.bool)
    mask[:, ::2] = True
    for method in ("cg", "cholesky"):  # cg: the undamped H is singular, so the direct solve takes over
        w = masked_least_squares(w0[:, :16], x.T @ x, mask, damp=0.0, method=method)  # type: ignore[arg-type]
        assert bool(torch.isfinite(w).all()) and bool((w[mask] == 0).all())


def test_solves_after_the_thread_count_was_set() -> None:
    """SparseGPT's column loop calls torch.set_num_threads; afterwards MKL's batched LU solve breaks
    on CPU (PyTorch 2.13), so the solver must not depend on it. In a fresh process, with a time limit."""
    code = ("import torch\n"
            "from llmprune.sparsity.exact_solver import masked_least_squares\n"
            "torch.set_num_threads(1); torch.set_num_threads(2)\n"
            "g = torch.Generator().manual_seed(0)\n"
            "x = torch.randn(1024, 384, generator=g); w = torch.randn(64, 384, generator=g)\n"
            "mask = torch.zeros(64, 384, dtype=torch.bool); mask[:, 1::2] = True\n"
            "out = masked_least_squares(w, x.T @ x, mask, method='cholesky')\n"
            "assert bool(torch.isfinite(out).all())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ERROR" not in proc.stderr, proc.stderr[-2000:]


def test_rejects_a_mask_or_hessian_of_the_wrong_shape() -> None:
    w0, h = problem()
    with pytest.raises(ValueError, match="mask must be bool"):
        masked_least_squares(w0, h, torch.zeros(w0.shape))
    with pytest.raises(ValueError, match="Hessian must be"):
        masked_least_squares(w0, h[:-1, :-1], torch.zeros(w0.shape, dtype=torch.bool))
    with pytest.raises(ValueError, match="method must be"):
        masked_least_squares(w0, h, torch.zeros(w0.shape, dtype=torch.bool), method="lu")  # type: ignore[arg-type]
