"""Masks, scores, patterns and input statistics: hand-computed cases and hypothesis invariants."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from llmprune.engine.observers import InputStats
from llmprune.errors import LLMPruneError
from llmprune.methods.magnitude import Magnitude, MagnitudeOptions
from llmprune.methods.wanda import Wanda, WandaOptions
from llmprune.sparsity.patterns import Pattern, parse_pattern
from llmprune.sparsity.scores import magnitude, wanda
from llmprune.sparsity.select import prune_mask

T, F = True, False
CPU = torch.device("cpu")


def mask_of(*rows: list[bool]) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=torch.bool)


# --------------------------------------------------------------------------- hand-made masks


def test_row_scope_prunes_lowest_half_of_each_row() -> None:
    scores = torch.tensor([[5.0, 1, 7, 3, 2, 8, 6, 4],
                           [0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6]])
    expected = mask_of([F, T, F, T, T, F, F, T],   # 1, 3, 2, 4 pruned
                       [T, F, T, F, T, F, T, F])   # 0.1, 0.2, 0.3, 0.4 pruned
    assert torch.equal(prune_mask(scores, Pattern(0.5, scope="row")), expected)


def test_matrix_scope_may_prune_rows_unevenly() -> None:
    scores = torch.tensor([[1.0, 2, 3, 4],
                           [12, 11, 10, 9],
                           [5, 6, 8, 7]])
    expected = mask_of([T, T, T, T], [F, F, F, F], [T, T, F, F])  # the six lowest: 1..6
    assert torch.equal(prune_mask(scores, Pattern(0.5, scope="matrix")), expected)
    # Row scope on the same scores prunes two per row instead.
    row = mask_of([T, T, F, F], [F, F, T, T], [T, T, F, F])
    assert torch.equal(prune_mask(scores, Pattern(0.5, scope="row")), row)


def test_two_four_on_magnitudes() -> None:
    weight = torch.tensor([[4.0, 3, 2, 1, 1, 5, 9, 2],
                           [-3.0, 0.5, -0.1, 2, -9, 8, 0, -7]])
    expected = mask_of([F, F, T, T, T, F, F, T],
                       [F, T, T, F, F, F, T, T])  # |W| group 2: 9, 8, 0, 7 -> 0 and 7 pruned
    assert torch.equal(prune_mask(magnitude(weight), Pattern(0.5, n=2, m=4)), expected)


def test_one_four_keeps_only_the_best_of_each_group() -> None:
    scores = torch.tensor([[4.0, 3, 2, 1, 1, 5, 9, 2]])
    assert torch.equal(prune_mask(scores, Pattern(0.75, n=1, m=4)), mask_of([F, T, T, T, T, T, F, T]))


def test_four_eight() -> None:
    scores = torch.tensor([[5.0, 1, 7, 3, 2, 8, 6, 4],
                           [8.0, 7, 6, 5, 4, 3, 2, 1]])
    expected = mask_of([F, T, F, T, T, F, F, T], [F, F, F, F, T, T, T, T])
    assert torch.equal(prune_mask(scores, Pattern(0.5, n=4, m=8)), expected)


def test_ties_prune_the_lower_index_first() -> None:
    assert torch.equal(prune_mask(torch.ones(1, 4), Pattern(0.5, scope="row")), mask_of([T, T, F, F]))
    assert torch.equal(prune_mask(torch.ones(2, 2), Pattern(0.5, scope="matrix")), mask_of([T, T], [F, F]))
    assert torch.equal(prune_mask(torch.full((1, 8), 2.0), Pattern(0.5, n=2, m=4)),
                       mask_of([T, T, F, F, T, T, F, F]))
    tied = torch.tensor([[2.0, 1, 1, 2, 1, 2]])  # three 1s, two to prune
    assert torch.equal(prune_mask(tied, Pattern(1 / 3, scope="row")), mask_of([F, T, T, F, F, F]))


@pytest.mark.parametrize("scope", ["row", "matrix"])
def test_sparsity_zero_prunes_nothing(scope: str) -> None:
    scores = torch.randn(3, 8)
    mask = prune_mask(scores, Pattern(0.0, scope=scope))  # type: ignore[arg-type]
    assert mask.dtype == torch.bool and not mask.any()


def test_prune_mask_rejects_non_matrix_scores() -> None:
    with pytest.raises(ValueError, match="2-D"):
        prune_mask(torch.ones(8), Pattern(0.5))


# --------------------------------------------------------------------------- Wanda vs magnitude

# One output row, four inputs. Column squared norms of X: 0.01, 25, 1, 4 (norms 0.1, 5, 1, 2).
WEIGHT = torch.tensor([[4.0, 1.0, -3.0, 2.0]])
X = torch.tensor([[0.1, 3.0, 1.0, 0.0],
                  [0.0, 4.0, 0.0, 2.0]])


def test_wanda_score_by_hand() -> None:
    sq_norm = X.pow(2).sum(0)
    torch.testing.assert_close(sq_norm, torch.tensor([0.01, 25.0, 1.0, 4.0]))
    torch.testing.assert_close(wanda(WEIGHT, sq_norm), torch.tensor([[0.4, 5.0, 3.0, 4.0]]))


def _ctx(stats: InputStats | None) -> SimpleNamespace:
    linear = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(WEIGHT)
    return SimpleNamespace(layer=SimpleNamespace(linears={"proj": linear}), stats={"proj": stats})


@pytest.mark.parametrize("sparsity, by_magnitude, by_wanda", [
    (0.25, [F, T, F, F], [T, F, F, F]),   # |W| drops the 1 (x-norm 5); Wanda drops the 4 (x-norm 0.1)
    (0.5, [F, T, F, T], [T, F, T, F]),
])
def test_wanda_and_magnitude_prune_different_weights(sparsity: float, by_magnitude: list[bool],
                                                     by_wanda: list[bool]) -> None:
    pattern = Pattern(sparsity, scope="row")
    assert torch.equal(prune_mask(magnitude(WEIGHT), pattern), mask_of(by_magnitude))
    assert torch.equal(prune_mask(wanda(WEIGHT, X.pow(2).sum(0)), pattern), mask_of(by_wanda))

    stats = InputStats(4, hessian=False, device=CPU)
    stats.update(X)
    ctx = _ctx(stats)
    Wanda(pattern, WandaOptions()).prune_layer(ctx)
    assert torch.equal(ctx.layer.linears["proj"].weight == 0, mask_of(by_wanda))
    ctx = _ctx(None)
    Magnitude(pattern, MagnitudeOptions(scope="row")).prune_layer(ctx)
    assert torch.equal(ctx.layer.linears["proj"].weight == 0, mask_of(by_magnitude))


# --------------------------------------------------------------------------- hypothesis invariants

SETTINGS = settings(max_examples=50, deadline=None)
sparsities = st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)


@st.composite
def score_matrices(draw: st.DrawFn, cols: int | None = None) -> torch.Tensor:
    rows = draw(st.integers(1, 8))
    cols = cols if cols is not None else draw(st.integers(1, 48))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):  # few distinct values: plenty of ties
        return torch.randint(0, 3, (rows, cols), generator=gen).float()
    return torch.randn(rows, cols, generator=gen)


def assert_lowest_pruned(scores: torch.Tensor, mask: torch.Tensor) -> None:
    """Within each group (a row of the inputs), every pruned score <= every kept score."""
    for s, m in zip(scores, mask, strict=True):
        if m.any() and (~m).any():
            assert s[m].max() <= s[~m].min()


@SETTINGS
@given(scores=score_matrices(), sparsity=sparsities)
def test_row_scope_prunes_exactly_floor_per_row(scores: torch.Tensor, sparsity: float) -> None:
    mask = prune_mask(scores, Pattern(sparsity, scope="row"))
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert torch.all(mask.sum(1) == math.floor(scores.shape[1] * sparsity))
    assert_lowest_pruned(scores, mask)


@SETTINGS
@given(scores=score_matrices(), sparsity=sparsities)
def test_matrix_scope_prunes_exactly_floor_overall(scores: torch.Tensor, sparsity: float) -> None:
    mask = prune_mask(scores, Pattern(sparsity, scope="matrix"))
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert int(mask.sum()) == math.floor(scores.numel() * sparsity)
    assert_lowest_pruned(scores.reshape(1, -1), mask.reshape(1, -1))


@st.composite
def nm_cases(draw: st.DrawFn) -> tuple[torch.Tensor, int, int]:
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    return draw(score_matrices(cols=m * draw(st.integers(1, 6)))), n, m


@SETTINGS
@given(case=nm_cases())
def test_every_nm_group_keeps_exactly_n(case: tuple[torch.Tensor, int, int]) -> None:
    scores, n, m = case
    pattern = parse_pattern(f"{n}:{m}", None)
    mask = prune_mask(scores, pattern)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    rows, cols = scores.shape
    groups = mask.reshape(rows, cols // m, m)  # (rows, groups, m)
    assert torch.all((~groups).sum(-1) == n)
    assert_lowest_pruned(scores.reshape(-1, m), mask.reshape(-1, m))


# --------------------------------------------------------------------------- parse_pattern


def test_parse_nm_pattern() -> None:
    pattern = parse_pattern("2:4", None)
    assert (pattern.sparsity, pattern.n, pattern.m, pattern.is_nm) == (0.5, 2, 4, True)
    assert pattern.prune_per_group == 2 and str(pattern) == "2:4"
    assert parse_pattern("2:4", 0.5) == pattern  # a consistent --sparsity is accepted
    assert parse_pattern("4:8", None).sparsity == 0.5
    assert parse_pattern("1:4", None).sparsity == 0.75


def test_parse_unstructured() -> None:
    for given_pattern in (None, "", "unstructured"):
        assert parse_pattern(given_pattern, 0.6, "matrix") == Pattern(0.6, scope="matrix")
    assert not parse_pattern(None, 0.0).is_nm


def test_contradictory_sparsity_raises() -> None:
    with pytest.raises(LLMPruneError, match="contradicts"):
        parse_pattern("2:4", 0.6)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_unit_interval_raises(sparsity: float) -> None:
    with pytest.raises(LLMPruneError, match=r"\[0, 1\)"):
        parse_pattern(None, sparsity)


def test_missing_sparsity_and_bad_scope_raise() -> None:
    with pytest.raises(LLMPruneError, match="--sparsity"):
        parse_pattern(None, None)
    with pytest.raises(LLMPruneError, match="scope"):
        parse_pattern(None, 0.5, "column")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["2-4", "4:2", "0:4", "4:4", "a:b", "2:4:8", ":4", "-1:4"])
def test_garbage_patterns_raise_helpful_errors(bad: str) -> None:
    with pytest.raises(LLMPruneError, match="N:M|0 < N < M") as info:
        parse_pattern(bad, None)
    assert repr(bad) in str(info.value)  # the message quotes what the user wrote


def test_unicode_digit_pattern_raises_llmprune_error() -> None:
    with pytest.raises(LLMPruneError):
        parse_pattern("²:4", None)


def test_check_width() -> None:
    pattern = parse_pattern("2:4", None)
    pattern.check_width(8, "layer 0 q_proj")
    with pytest.raises(LLMPruneError, match=r"2:4.*6.*layer 0 q_proj"):
        pattern.check_width(6, "layer 0 q_proj")
    with pytest.raises(LLMPruneError):
        parse_pattern("4:8", None).check_width(12, "x")
    Pattern(0.5).check_width(7, "unstructured never checks")


# --------------------------------------------------------------------------- InputStats


@pytest.mark.parametrize("hessian", [False, True])
def test_input_stats_accumulate_like_the_batch_formulas(hessian: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, 3, 5, generator=gen), torch.randn(4, 5, generator=gen),
              torch.randn(1, 7, 5, generator=gen, dtype=torch.float64)]
    stats = InputStats(5, hessian=hessian, device=CPU)
    for chunk in chunks:
        stats.update(chunk)
    x = torch.cat([c.reshape(-1, 5).float() for c in chunks])  # (17, 5)
    assert stats.tokens == 17 and not stats.nonfinite
    assert stats.sq_norm.dtype == torch.float32
    torch.testing.assert_close(stats.sq_norm, x.pow(2).sum(0))
    if hessian:
        assert stats.hessian is not None
        torch.testing.assert_close(stats.hessian, x.t() @ x)
    else:
        assert stats.hessian is None


def test_input_stats_without_moments_keep_the_same_norms_and_refuse_moments() -> None:
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(3))
    full, lean = InputStats(4, hessian=False, device=CPU), InputStats(4, hessian=False, device=CPU, moments=False)
    full.update(x)
    lean.update(x)
    assert torch.equal(full.sq_norm, lean.sq_norm) and full.tokens == lean.tokens == 9
    torch.testing.assert_close(full.mean, x.mean(0))
    torch.testing.assert_close(full.variance, x.var(0))
    with pytest.raises(RuntimeError, match="without moments"):
        _ = lean.mean
    with pytest.raises(RuntimeError, match="without moments"):
        _ = lean.variance


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("hessian", [False, True])
def test_input_stats_flag_nonfinite_inputs(bad: float, hessian: bool) -> None:
    stats = InputStats(3, hessian=hessian, device=CPU)
    stats.update(torch.ones(2, 3))
    assert not stats.nonfinite
    x = torch.ones(2, 3)
    x[1, 2] = bad
    stats.update(x)
    assert stats.nonfinite
    assert torch.isfinite(stats.sq_norm).all()


def test_row_selection_equals_a_stable_sort_with_many_ties() -> None:
    from llmprune.sparsity.select import prune_lowest_per_row

    for trial in range(60):
        gen = torch.Generator().manual_seed(trial)
        rows, cols = torch.randint(1, 7, (2,), generator=gen).tolist()
        scores = torch.randint(0, 4, (rows, 4 * cols), generator=gen).float()  # mostly ties
        for count in range(4 * cols + 1):
            order = torch.sort(scores, dim=-1, stable=True).indices[:, :count]
            expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
            assert torch.equal(prune_lowest_per_row(scores, count), expected), (trial, count)


@pytest.mark.parametrize("threads", [2, 3])
def test_row_selection_in_parallel_chunks_is_the_same(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmprune.sparsity import select

    gen = torch.Generator().manual_seed(threads)
    scores = torch.randint(0, 50, (37, 64), generator=gen).float()  # ties in most rows
    scores[::5] = torch.rand(8, 64, generator=gen)  # and rows without any
    expected = {count: select.prune_lowest_per_row(scores, count) for count in (1, 17, 32, 63, 64)}
    monkeypatch.setattr(select, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(select.torch, "get_num_threads", lambda: threads)
    assert select._row_chunks(37, scores.numel()) == threads
    for count, mask in expected.items():
        order = torch.sort(scores, dim=-1, stable=True).indices[:, :count]
        assert torch.equal(mask, torch.zeros_like(mask).scatter_(1, order, True))
        assert torch.equal(select.prune_lowest_per_row(scores, count), mask), count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_wanda_score_leaves_the_weight_alone(dtype: torch.dtype) -> None:
    weight = torch.randn(6, 8).to(dtype)
    before = weight.clone()
    norm = torch.rand(8)
    got = wanda(weight, norm)
    assert torch.equal(weight, before) and got.dtype == torch.float32
    assert torch.equal(got, weight.float().abs() * norm.sqrt().unsqueeze(0))
