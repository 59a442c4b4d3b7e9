"""LLM-Barber's swap rule (``sparsity.rebuild``): hand-computed masks and property tests."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmprune.errors import LLMPruneError
from llmprune.sparsity.rebuild import GRANULARITIES, rebuild_mask

T, F = True, False


def mask(rows: list[list[bool]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def scores(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- hand-computed examples


def test_one_row_counts_beneficial_swaps() -> None:
    # pruned {0: 4, 1: 3} -> growth [4, 3]; kept {2: 1, 3: 2} -> prune [1, 2]; 4 > 1, 3 > 2: r = 2
    m, s = mask([[T, T, F, F]]), scores([[4, 3, 1, 2]])
    assert torch.equal(rebuild_mask(m, s, 1.0), mask([[F, F, T, T]]))
    assert torch.equal(rebuild_mask(m, s, 0.5), mask([[F, T, T, F]]))  # 1 swap: grow 4, prune 1
    assert torch.equal(rebuild_mask(m, s, 0.4), m)  # floor(0.8) = 0


def test_only_improving_pairs_count() -> None:
    # growth [5, 0.5], prune [1, 2]: 5 > 1 but 0.5 < 2, so r = 1 even at ratio 1
    m, s = mask([[T, T, F, F]]), scores([[5, 0.5, 1, 2]])
    assert torch.equal(rebuild_mask(m, s, 1.0), mask([[F, T, T, F]]))


M2 = mask([[T, F, T, F], [F, T, F, T]])
S2 = scores([[8, 1, 2, 3], [4, 5, 6, 7]])


def test_output_granularity_per_row() -> None:
    # row 0: growth [8, 2], prune [1, 3] -> r = 1; row 1: growth [7, 5], prune [4, 6] -> r = 1
    assert torch.equal(rebuild_mask(M2, S2, 1.0, "output"), mask([[F, T, T, F], [T, T, F, F]]))


def test_layer_granularity_whole_matrix() -> None:
    # growth [8, 7, 5, 2], prune [1, 3, 4, 6]: r = 3; rows may drift, the matrix keeps 4 pruned
    assert torch.equal(rebuild_mask(M2, S2, 1.0, "layer"), mask([[F, T, T, T], [T, F, F, F]]))
    assert torch.equal(rebuild_mask(M2, S2, 0.5, "layer"), mask([[F, T, T, F], [F, T, F, T]]))  # floor(1.5) = 1


def test_input_granularity_per_column() -> None:
    # columns 0, 1, 3 each have one improving pair; column 2 (pruned 2 vs kept 6) has none
    assert torch.equal(rebuild_mask(M2, S2, 1.0, "input"), mask([[F, T, T, T], [T, F, F, F]]))
    assert torch.equal(rebuild_mask(M2, S2, 0.9, "input"), M2)  # floor(0.9 * 1) = 0 in every column


def test_block_granularity_across_matrices() -> None:
    # growth [3 (A0), 2 (B1)], prune [0.5 (B0), 1 (A1)]: r = 2
    a, b = mask([[T, F]]), mask([[F, T]])
    sa, sb = scores([[3, 1]]), scores([[0.5, 2]])
    new_a, new_b = rebuild_mask([a, b], [sa, sb], 0.5, "block")
    assert torch.equal(new_a, mask([[F, F]])) and torch.equal(new_b, mask([[T, T]]))  # per-matrix drift
    new_a, new_b = rebuild_mask([a, b], [sa, sb], 1.0, "block")
    assert torch.equal(new_a, mask([[F, T]])) and torch.equal(new_b, mask([[T, F]]))


def test_n_of_m_compensates_inside_the_group() -> None:
    # 2:4; growth [9, 1, 0.5, 0.2], prune [2, 3, 4, 5] -> r = 1: grow index 0 (group 0), then prune
    # group 0's lowest kept weight (index 2, score 2), not the row's lowest.
    m = mask([[T, T, F, F, T, F, T, F]])
    s = scores([[9, 1, 2, 3, 0.5, 4, 0.2, 5]])
    assert torch.equal(rebuild_mask(m, s, 1.0, "output", m=4), mask([[F, T, T, F, T, F, T, F]]))


def test_n_of_m_growth_capped_by_the_group_kept_count() -> None:
    # 1:4; growth [9, 8, 7, .4, .3, .2], prune [.1, 1] -> r = 2, both best growths fall in group 0,
    # which keeps one weight: only the best (9) is regrown and the group's kept weight pruned.
    m = mask([[T, T, T, F, F, T, T, T]])
    s = scores([[9, 8, 7, 1, 0.1, 0.2, 0.3, 0.4]])
    assert torch.equal(rebuild_mask(m, s, 1.0, "output", m=4), mask([[F, T, T, T, F, T, T, T]]))


def test_ties_are_broken_by_index() -> None:
    m, s = mask([[T, T, F, F]]), scores([[2, 2, 1, 1]])
    assert torch.equal(rebuild_mask(m, s, 0.5), mask([[F, T, T, F]]))


def test_bad_arguments() -> None:
    m, s = mask([[T, F, T, F]]), scores([[1, 2, 3, 4]])
    with pytest.raises(LLMPruneError, match="ratio"):
        rebuild_mask(m, s, 1.5)
    with pytest.raises(LLMPruneError, match="granularity"):
        rebuild_mask(m, s, 0.5, "channel")
    with pytest.raises(LLMPruneError, match="N:M"):
        rebuild_mask(m, s, 0.5, "input", m=4)
    with pytest.raises(ValueError):
        rebuild_mask(m, s[:, :2], 0.5)
    with pytest.raises(ValueError, match="finite"):
        rebuild_mask(m, scores([[1, float("nan"), 3, 4]]), 0.5)
    with pytest.raises(ValueError, match="divide"):
        rebuild_mask(mask([[T, F, T]]), scores([[1, 2, 3]]), 0.5, m=2)


# ---------------------------------------------------------------- properties


def reference_r(old: list[bool], values: list[float]) -> int:
    """The spec, literally: pair sorted growth and prune scores, count growth[k] > prune[k]."""
    growth = sorted((v for p, v in zip(old, values, strict=True) if p), reverse=True)
    prune = sorted(v for p, v in zip(old, values, strict=True) if not p)
    return sum(g > q for g, q in zip(growth, prune, strict=False))


def groups_of(tensors: list[torch.Tensor], granularity: str) -> list[list[torch.Tensor]]:
    """For each comparison group, its entries (flattened) from each matrix, concatenated."""
    if granularity == "output":
        return [[row for row in t] for t in tensors]
    if granularity == "input":
        return [[col for col in t.t()] for t in tensors]
    if granularity == "layer":
        return [[t.reshape(-1)] for t in tensors]
    return [[torch.cat([t.reshape(-1) for t in tensors])]]


def flat_groups(tensors: list[torch.Tensor], granularity: str) -> list[torch.Tensor]:
    return [g for per_matrix in groups_of(tensors, granularity) for g in per_matrix]


@st.composite
def problems(draw: st.DrawFn, nm: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor], float, int | None]:
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    count = draw(st.integers(1, 3))
    m = draw(st.sampled_from([2, 4, 8])) if nm else None
    n = draw(st.integers(1, m - 1)) if m is not None else None
    levels = draw(st.sampled_from([3, 50, 10**6]))  # few levels -> many ties
    masks, score_list = [], []
    for _ in range(count):
        rows = draw(st.integers(1, 5))
        cols = (m * draw(st.integers(1, 3))) if m is not None else draw(st.integers(1, 9))
        s = torch.randint(0, levels, (rows, cols), generator=gen).float() / levels
        if m is not None:
            assert n is not None
            keep = torch.rand(rows, cols // m, m, generator=gen).argsort(-1) < n
            masks.append(~keep.reshape(rows, cols))
        else:
            density = draw(st.floats(0.0, 1.0))
            masks.append(torch.rand(rows, cols, generator=gen) < density)
        score_list.append(s)
    ratio = draw(st.one_of(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]), st.floats(0.0, 1.0)))
    return masks, score_list, ratio, m


@settings(max_examples=150, deadline=None)
@given(problem=problems(), granularity=st.sampled_from(GRANULARITIES))
def test_unstructured_properties(problem, granularity: str) -> None:  # type: ignore[no-untyped-def]
    masks, score_list, ratio, _ = problem
    if granularity != "block":
        masks, score_list = masks[:1], score_list[:1]
    new = rebuild_mask(masks, score_list, ratio, granularity)
    olds, news, vals = (flat_groups(x, granularity) for x in (masks, new, score_list))
    for old, nw, val in zip(olds, news, vals, strict=True):
        assert int(nw.sum()) == int(old.sum())  # the group's sparsity is exact
        grown, cut = old & ~nw, ~old & nw
        r = reference_r(old.tolist(), val.tolist())
        assert int(grown.sum()) == int(cut.sum()) == math.floor(ratio * r)
        if grown.any():  # the best pruned are regrown and the worst kept are pruned
            still_pruned, still_kept = old & nw, ~old & ~nw
            if still_pruned.any():
                assert val[grown].min() >= val[still_pruned].max()
            if still_kept.any():
                assert val[cut].max() <= val[still_kept].min()
    if ratio == 0:
        assert all(torch.equal(a, b) for a, b in zip(new, masks, strict=True))


@settings(max_examples=150, deadline=None)
@given(problem=problems(nm=True), granularity=st.sampled_from(["block", "layer", "output"]))
def test_n_of_m_properties(problem, granularity: str) -> None:  # type: ignore[no-untyped-def]
    masks, score_list, ratio, m = problem
    assert m is not None
    kept_per_group = int((~masks[0][0, :m]).sum())
    if granularity != "block":
        masks, score_list = masks[:1], score_list[:1]
    new = rebuild_mask(masks, score_list, ratio, granularity, m=m)
    for old, nw, val in zip(masks, new, score_list, strict=True):
        rows, cols = nw.shape
        kept = (~nw).reshape(rows, cols // m, m).sum(-1)
        assert bool((kept == kept_per_group).all())  # every group keeps exactly N
        # inside each M-group the compensating prunes are the lowest-scoring previously kept weights
        groups = zip((~old & nw).reshape(-1, m), (~old & ~nw).reshape(-1, m), val.reshape(-1, m), strict=True)
        for cut, still_kept, group_val in groups:
            if cut.any() and still_kept.any():
                assert group_val[cut].max() <= group_val[still_kept].min()
    if kept_per_group >= m - kept_per_group:  # no group can be asked to regrow more than it keeps
        olds, news, vals = (flat_groups(x, granularity) for x in (masks, new, score_list))
        for old, nw, val in zip(olds, news, vals, strict=True):
            r = reference_r(old.tolist(), val.tolist())
            assert int((old & ~nw).sum()) == int((~old & nw).sum()) == math.floor(ratio * r)
    else:
        olds, news, vals = (flat_groups(x, granularity) for x in (masks, new, score_list))
        for old, nw, val in zip(olds, news, vals, strict=True):
            assert int((old & ~nw).sum()) <= math.floor(ratio * reference_r(old.tolist(), val.tolist()))
    if ratio == 0:
        assert all(torch.equal(a, b) for a, b in zip(new, masks, strict=True))


def test_vectorised_on_a_large_matrix() -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(512, 1024, generator=gen)
    old = torch.rand(512, 1024, generator=gen) < 0.5
    new = rebuild_mask(old, s, 0.1, "output")
    assert torch.equal(new.sum(1), old.sum(1))


@pytest.mark.parametrize(("granularity", "nm"), [("output", None), ("input", None), ("output", 4)])
def test_rows_in_blocks_give_the_same_masks(monkeypatch: pytest.MonkeyPatch, granularity: str, nm: int | None) -> None:
    """The rule runs on blocks of rows (bounded memory on 7B-sized matrices): identical masks, with
    ties, for block sizes that divide the rows and that do not."""
    from llmprune.sparsity import rebuild

    gen = torch.Generator().manual_seed(1)
    s = torch.randint(0, 20, (37, 48), generator=gen).float()  # many ties
    if nm is None:
        old = torch.rand(37, 48, generator=gen) < 0.5
    else:  # 2:4, the pruned two of every four chosen at random
        old = torch.zeros(37, 12, 4, dtype=torch.bool).scatter_(
            -1, torch.rand(37, 12, 4, generator=gen).argsort(-1)[..., :2], True).reshape(37, 48)
    whole = rebuild_mask(old, s, 0.5, granularity, m=nm)
    for entries in (48, 5 * 48, 7 * 48 + 3, 10**6):
        monkeypatch.setattr(rebuild, "CHUNK_ENTRIES", entries)
        assert torch.equal(rebuild_mask(old, s, 0.5, granularity, m=nm), whole), entries


def test_paired_rule_by_hand() -> None:
    # row 0, groups [0:4] and [4:8], 2:4. Group 0: best pruned 5 vs worst kept 1 -> gain 4.
    # Group 1: best pruned 2 vs worst kept 3 -> gain -1 (no swap). r = 1 -> ratio 1 swaps group 0 only.
    old = mask([[T, T, F, F, T, T, F, F]])
    s = scores([[5, 0, 1, 9, 2, 0, 3, 4]])
    new = rebuild_mask(old, s, 1.0, "output", m=4, nm_rule="paired")
    assert new.tolist() == [[F, T, T, F, T, T, F, F]]
    assert torch.equal(rebuild_mask(old, s, 0.99, "output", m=4, nm_rule="paired"), old)  # floor(0.99 * 1) = 0
    # The reference rule regrows by the row comparison (5 > 1, 2 < 3: r = 1) and compensates in the group.
    assert torch.equal(rebuild_mask(old, s, 1.0, "output", m=4), new)
    with pytest.raises(LLMPruneError, match="N:M rebuild rule"):
        rebuild_mask(old, s, 1.0, "output", m=4, nm_rule="greedy")


def test_paired_rule_never_lowers_the_score_where_the_reference_does() -> None:
    # Row: group 0 holds the row's best pruned (9) but its kept weights score 8 and 8.5; group 1's
    # kept weights score 0.1 and 0.2. Reference: growth [9, 0.5..] vs prune [0.1, ..]: r >= 1, regrows 9
    # and prunes 8 in group 0 (gain 1). Paired: group 0 gain 1, group 1 gain (0.5 - 0.1); both positive.
    old = mask([[T, F, T, F, T, F, T, F]])
    s = scores([[9, 8, 0, 8.5, 0.5, 0.1, 0.3, 0.2]])
    ref = rebuild_mask(old, s, 1.0, "output", m=2)
    paired = rebuild_mask(old, s, 1.0, "output", m=2, nm_rule="paired")
    kept_score = lambda new: float(s[~new].sum())  # noqa: E731
    assert kept_score(paired) >= kept_score(old)
    assert kept_score(paired) >= kept_score(ref)


@settings(max_examples=150, deadline=None)
@given(problem=problems(nm=True), granularity=st.sampled_from(["block", "layer", "output"]))
def test_paired_rule_properties(problem, granularity: str) -> None:  # type: ignore[no-untyped-def]
    masks, score_list, ratio, m = problem
    assert m is not None
    kept_per_group = int((~masks[0][0, :m]).sum())
    if granularity != "block":
        masks, score_list = masks[:1], score_list[:1]
    new = rebuild_mask(masks, score_list, ratio, granularity, m=m, nm_rule="paired")
    beneficial, swapped = [], []
    for old, nw, val in zip(masks, new, score_list, strict=True):
        rows, cols = nw.shape
        assert bool(((~nw).reshape(rows, cols // m, m).sum(-1) == kept_per_group).all())  # exactly N per group
        for o, n_, v in zip(old.reshape(-1, m), nw.reshape(-1, m), val.reshape(-1, m), strict=True):
            gain = (float(v[o].max()) - float(v[~o].min())) if o.any() and (~o).any() else -1.0
            grown, cut = o & ~n_, ~o & n_
            assert int(grown.sum()) == int(cut.sum()) <= 1
            if grown.any():
                assert float(v[grown].sum()) - float(v[cut].sum()) == pytest.approx(gain) and gain > 0
            beneficial.append(gain > 0)
            swapped.append(bool(grown.any()))
        if granularity == "output":  # floor(ratio * r) per row
            per_row = len(beneficial) // rows if granularity == "output" else None
            b_rows = [beneficial[i:i + per_row] for i in range(0, len(beneficial), per_row)]
            s_rows = [swapped[i:i + per_row] for i in range(0, len(swapped), per_row)]
            for b, sw in zip(b_rows, s_rows, strict=True):
                assert sum(sw) == math.floor(ratio * sum(b))
            beneficial, swapped = [], []
    if granularity != "output":
        assert sum(swapped) == math.floor(ratio * sum(beneficial))
