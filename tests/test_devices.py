"""Several compute devices: calibration batches split over copies of the layer (engine.devices).

No GPU here: the extra devices are CPU threads, which run the very code a multi-GPU run does
(copies of the layer, one thread per device, statistics summed on the first device, outputs
gathered in batch order, pruned weights copied back before the propagating forward).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import llmprune
from llmprune.engine.engine import run_layerwise
from llmprune.errors import LLMPruneError
from llmprune.methods.base import METHODS
from llmprune.models.loading import pick_devices
from llmprune.models.view import model_view
from llmprune.sparsity.patterns import Pattern

from .conftest import ByteTokenizer, tiny_model
from .test_engine import Recorder, calib

CPU = torch.device("cpu")


def run(model: torch.nn.Module, method: Any, ids: torch.Tensor, extra: list[torch.device]) -> list[dict[str, Any]]:
    view = model_view(model)
    method.validate(view)
    reports = run_layerwise(view, method, ids, device=CPU, extra_devices=extra)
    method.finalize(view)
    return reports


def test_statistics_and_outputs_of_split_batches_equal_one_device() -> None:
    ids = calib(n=5)  # 5 batches over 3 devices: shares of 2, 2 and 1
    one, split = Recorder(), Recorder()
    run(tiny_model("gemma2"), one, ids, [])
    run(tiny_model("gemma2"), split, ids, [CPU, CPU])
    for index, outputs in one.outputs.items():
        for a, b in zip(outputs, split.outputs[index], strict=True):
            assert torch.equal(a, b), index  # each batch computed by an identical copy of the layer
        for name, sq in one.sq_norms[index].items():
            torch.testing.assert_close(split.sq_norms[index][name], sq, rtol=1e-6, atol=0)  # sums in another order


@pytest.mark.parametrize(("family", "method", "options", "pattern"), [
    ("llama", "wanda", {}, Pattern(0.5)),
    ("opt", "sparsegpt", {}, Pattern(0.5, n=2, m=4)),
    ("qwen2", "barber", {"ratio": 0.2}, Pattern(0.5)),
    ("mistral", "cfsp", {}, Pattern(0.3)),
])
def test_pruning_with_split_batches_equals_one_device(family: str, method: str, options: dict[str, Any],
                                                      pattern: Pattern) -> None:
    ids = calib(n=4)
    cls = METHODS.get(method)
    results = []
    for extra in ([], [CPU]):
        model = tiny_model(family)
        reports = run(model, cls(pattern, cls.Options(**options)), ids, extra)
        results.append((model, reports))
    (a, _), (b, _) = results
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert pa.shape == pb.shape, name
        # The statistics differ only in the order of float32 additions: the same masks, weights within rounding.
        assert torch.equal(pa == 0, pb == 0), name
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-4)  # SparseGPT's solve amplifies them a little


def test_devices_are_parsed_and_checked_before_any_work(calib_file: Any) -> None:
    assert pick_devices("cpu") == [CPU] and pick_devices("cpu, cpu") == [CPU, CPU]
    with pytest.raises(LLMPruneError, match="unknown device 'gpu0'"):
        pick_devices("cpu,gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(LLMPruneError, match="CUDA is not available"):
            pick_devices("cuda:0,cuda:1")
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LLMPruneError, match="unknown device"):
        llmprune.prune(model, tokenizer=ByteTokenizer(), method="wanda", sparsity=0.5, calib_dataset=str(calib_file),
                       nsamples=2, seqlen=16, device="cpu,tpu9")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    result = llmprune.prune(model, tokenizer=ByteTokenizer(), method="wanda", sparsity=0.5,
                            calib_dataset=str(calib_file), nsamples=3, seqlen=16, device="cpu,cpu")
    assert result.report["devices"] == ["cpu", "cpu"] and result.report["sparsity"]["overall"] == 0.5


@pytest.mark.parametrize("method", ["wanda", "flap"])
def test_streamed_run_with_split_batches(method: str, calib_file: Any, tmp_path: Any) -> None:
    from .test_streaming import prune_args, sharded_model, tensors

    src = sharded_model(tmp_path, "llama")
    args = prune_args(calib_file, method=method, sparsity=0.3)
    one = llmprune.prune(str(src), output=str(tmp_path / "one"), stream="on", **args)
    two = llmprune.prune(str(src), output=str(tmp_path / "two"), stream="on", device="cpu,cpu", **args)
    assert two.report["devices"] == ["cpu", "cpu"] and two.report["streaming"]["layers"] == 3
    ta, tb = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].shape == tb[key].shape and torch.equal(ta[key] == 0, tb[key] == 0), key
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-4, atol=1e-6)
    assert one.report["params"] == two.report["params"]
