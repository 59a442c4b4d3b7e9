"""method.faithful=true reproduces the released code: each option against a port (tests/reference/released.py)."""

from __future__ import annotations

import pytest
import torch

from llmprune.engine.observers import InputStats
from llmprune.errors import LLMPruneError
from llmprune.methods import METHODS
from llmprune.methods.barber import BarberOptions
from llmprune.methods.cfsp import CfspOptions
from llmprune.methods.sparsegpt import SparseGPTOptions
from llmprune.methods.structured_baselines import FlapOptions
from llmprune.sparsity import channels
from llmprune.sparsity.allocation import reference_channel_counts
from llmprune.sparsity.obs_solver import sparsegpt_prune
from llmprune.sparsity.patterns import Pattern
from llmprune.sparsity.rebuild import counting, swap_count

from .reference import released


def test_faithful_fills_the_options_and_refuses_a_clash() -> None:
    opts = SparseGPTOptions(faithful=True)
    assert (opts.scope, opts.block_count, opts.dead_columns) == ("matrix", "reference", "zero")
    assert CfspOptions(faithful=True).score == "faithful" and CfspOptions(faithful=True).budget == "reference"
    assert FlapOptions(faithful=True).fluctuation == "reference"
    b = BarberOptions(faithful=True, ratio=0.1)
    assert (b.order, b.swap_count, b.ratio) == ("reference", "float32", 0.1)
    assert SparseGPTOptions(faithful=True, block_count="reference").block_count == "reference"  # same value: fine
    for cls, clash in [(SparseGPTOptions, {"block_count": "exact"}), (CfspOptions, {"normalize": "per_token"}),
                       (FlapOptions, {"count": "round"}), (BarberOptions, {"order": "layer"}),
                       (BarberOptions, {"guard": True})]:
        with pytest.raises(ValueError, match=f"faithful=true fixes.*drop {next(iter(clash))}="):
            cls(faithful=True, **clash)
    for name in ("wanda", "sparsegpt", "barber", "cfsp", "flap"):
        assert "faithful" in METHODS.get(name).Options.model_fields


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.7])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_reference_count_and_dead_columns_equal_fasterprune(sparsity: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rows, cols = 24, 80
    weight = torch.randn(rows, cols, generator=gen)
    x = torch.randn(256, cols, generator=gen) @ (torch.eye(cols) + torch.randn(cols, cols, generator=gen) / cols**0.5)
    x[:, [3, 40]] = 0.0  # dead inputs
    hessian = x.t() @ x
    ours, mask = sparsegpt_prune(weight, hessian, Pattern(sparsity, scope="matrix"), block_size=32,
                                 count="reference", zero_dead=True)
    ref = released.sparsegpt_fasterprune(weight, hessian, sparsity, blocksize=32)
    assert torch.equal(ours == 0, ref == 0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(weight.abs().max()))
    per_block = int(rows * 32 * sparsity) + 1
    assert int(mask.sum()) >= (cols // 32) * per_block  # one more per block than the exact count
    exact, _ = sparsegpt_prune(weight, hessian, Pattern(sparsity, scope="matrix"), block_size=32)
    assert int((exact == 0).sum()) < int((ours == 0).sum())


@pytest.mark.parametrize("round_to", [1, 128])
def test_cfsp_reference_budget_equals_the_released_thresholds(round_to: int) -> None:
    gen = torch.Generator().manual_seed(0)
    width = 512
    keep = [0.05, 0.1, 0.37, 0.5, 0.6251, 0.8, 0.98, 0.999]  # 0.05 * 512 < 64: the released code keeps all
    metric = torch.rand(len(keep), width, generator=gen)
    ref = released.cfsp_masks(metric, keep, cuda_friendly=round_to == 128)
    counts = reference_channel_counts(torch.tensor(keep, dtype=torch.float64), width, round_to)
    assert counts == [int(m.sum()) for m in ref]
    for i, count in enumerate(counts):  # the same channels: the top ``count`` scores
        top = torch.zeros(width, dtype=torch.bool)
        top[torch.argsort(metric[i], descending=True, stable=True)[:count]] = True
        assert torch.equal(top, ref[i])
    if round_to == 128:
        assert counts[0] == width  # the reference bug, reproduced
        assert counts[3] == 256  # 256 exactly
        assert reference_channel_counts(torch.tensor([192 / 512], dtype=torch.float64), width, 128) == [256]  # half up


def test_flap_reference_fluctuation_and_count_equal_the_released_add_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    dim, seqlen = 16, 12
    samples = [torch.randn(seqlen, dim, generator=gen) * (1 + i) + i for i in range(5)]
    stats = InputStats(dim, hessian=False, device=torch.device("cpu"))
    stats.update(torch.stack(samples[:2]))  # a batch of two samples, then three of one
    for s in samples[2:]:
        stats.update(s.unsqueeze(0))
    ref = released.FlapFluctuation(dim)
    for s in samples:
        ref.add_batch(s)
    assert isinstance(ref.fluc_inp, torch.Tensor)
    torch.testing.assert_close(stats.fluctuation, ref.fluc_inp, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(stats.fluctuation, stats.variance, rtol=1e-2)  # not our variance

    metric = torch.rand(4, 50, generator=gen) * channels.flap(torch.ones(3, 50), torch.ones(50))
    for ratio in (0.2, 0.3, 0.55):
        kept = int(released.flap_mask(metric, ratio).sum())
        n = metric.numel()
        assert n - kept == n - int(n * (1 - ratio))


def test_barber_float32_swap_count_is_the_released_one() -> None:
    r = torch.tensor([100, 7, 1000, 3, 2**24 + 3])
    with counting("float32"):
        got = swap_count(0.29, r)
    assert got.tolist() == [released.barber_swap_count(int(v), 0.29) for v in r]
    assert int(got[0]) == 29 and int(swap_count(0.29, r)[0]) == 28  # exact floor(0.29 * 100) in float64
    with pytest.raises(LLMPruneError, match="unknown swap count"), counting("half"):
        pass


@pytest.mark.parametrize(("method", "sparsity", "extra"), [
    ("wanda", 0.5, {}), ("sparsegpt", 0.5, {}), ("barber", 0.5, {"ratio": 0.2}), ("cfsp", 0.3, {}), ("flap", 0.3, {})])
def test_faithful_end_to_end_on_a_tiny_model(method: str, sparsity: float, extra: dict, calib_file) -> None:  # type: ignore[no-untyped-def]
    """Every method runs with faithful=true, records what it set, and differs from the default where
    the released code does (SparseGPT: one more weight per block; FLAP: its own count and scores)."""
    import llmprune

    from .conftest import ByteTokenizer, tiny_model

    runs = {}
    for tag in ("default", "faithful"):
        options = {**extra, **({"faithful": True} if tag == "faithful" else {})}
        runs[tag] = llmprune.prune(tiny_model("llama"), tokenizer=ByteTokenizer(), method=method, sparsity=sparsity,
                                   calib_dataset=str(calib_file), nsamples=4, seqlen=32, method_options=options)
    recorded = runs["faithful"].report["recipe"]["method"]
    assert recorded["faithful"] is True
    if method == "wanda":  # identical already
        a, b = (r.model.state_dict() for r in runs.values())
        assert all(torch.equal(a[k], b[k]) for k in a)
    if method == "sparsegpt":
        assert runs["faithful"].report["sparsity"]["overall"] > runs["default"].report["sparsity"]["overall"]
    if method == "barber":
        assert recorded["order"] == "reference" and recorded["swap_count"] == "float32"
    if method == "cfsp":
        widths = runs["faithful"].report["structure"]["mlp_channels"]["widths"]
        keep = runs["faithful"].report["structure"]["keep_fractions"]
        dense = runs["faithful"].report["structure"]["mlp_channels"]["dense_width"]
        assert widths == [min(dense, int(dense * k) + 1) for k in keep]  # keep: as reported (6 decimals)
