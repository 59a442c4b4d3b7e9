"""Mixture-of-Experts: the expert view, routed calibration statistics, the unstructured methods on experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from torch import nn

import llmprune
from llmprune.engine.engine import run_layerwise
from llmprune.errors import LLMPruneError
from llmprune.methods.base import Method, MethodOptions
from llmprune.models.moe import ExpertLinear
from llmprune.models.roles import Role
from llmprune.models.view import model_view
from llmprune.sparsity.patterns import Pattern

from .conftest import ByteTokenizer
from .moe_families import BUILT, NUM_EXPERTS, build_status, moe_families, tiny_moe

CORE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3"]


def _view_or_refusal(model_type: str) -> tuple[object | None, str | None]:
    try:
        return model_view(BUILT[model_type]), None
    except LLMPruneError as exc:
        return None, str(exc)


@pytest.fixture(scope="module")
def supported() -> list[str]:
    out = []
    for model_type, err in build_status().items():
        if err is None:
            view, _ = _view_or_refusal(model_type)
            if view is not None and any(layer.is_moe for layer in view.layers):
                out.append(model_type)
    return out


def test_families_are_enumerated_and_each_is_supported_or_refused_by_name(supported: list[str]) -> None:
    families = moe_families()
    assert set(CORE) <= set(families)  # enumerated from the mapping, not listed
    assert set(CORE) <= set(supported)
    for model_type, err in build_status().items():
        if err is not None:
            continue
        view, refusal = _view_or_refusal(model_type)
        if refusal is not None:  # the error names the module or linears it could not place
            assert "model.layers." in refusal and ("no known role" in refusal or "experts interface" in refusal)
        else:
            assert view is not None


@pytest.mark.parametrize("model_type", CORE)
def test_expert_linears_are_views_with_roles_and_routers_are_never_presented(model_type: str) -> None:
    model = tiny_moe(model_type)
    view = model_view(model)
    moe_layers = [layer for layer in view.layers if layer.is_moe]
    assert moe_layers
    config = model.config
    for layer in moe_layers:
        group = layer.experts[0]
        assert group.num_experts == NUM_EXPERTS and group.top_k == 2
        assert group.router is not None and group.router_path is not None
        router_params = {id(p) for p in group.router.parameters()}
        assert not any(isinstance(lin, nn.Linear) and id(lin.weight) in router_params for lin in layer.linears.values())
        assert not any("gate.weight" in n or n.endswith("shared_expert_gate") for n in layer.linears)
        for e in range(NUM_EXPERTS):
            gate, up, down = (layer.linears[n] for n in group.names(e))
            assert {layer.roles[n] for n in group.names(e)} == {Role.MLP_IN, Role.MLP_OUT}
            assert gate.in_features == up.in_features == down.out_features == config.hidden_size
            assert gate.out_features == up.out_features == down.in_features
        # A write into the view lands in the fused parameter, at that expert only.
        lin = layer.linears[group.names(1)[1]]  # expert 1's up projection
        assert isinstance(lin, ExpertLinear)
        before = {n: p.detach().clone() for n, p in group.module.named_parameters()}
        x = torch.randn(5, config.hidden_size)
        reference = nn.functional.linear(x, lin.weight)
        with torch.no_grad():
            lin.weight[0, :3] = 0.0
        changed = {n for n, p in group.module.named_parameters() if not torch.equal(p, before[n])}
        assert changed == {group.up_name}
        assert int((before[group.up_name] != getattr(group.module, group.up_name)).sum()) == 3
        assert (getattr(group.module, group.up_name)[0] == before[group.up_name][0]).all()  # expert 0 untouched
        assert not torch.equal(nn.functional.linear(x, lin.weight), reference)
    if model_type == "deepseek_v3":  # first_k_dense_replace: layer 0 is a dense MLP
        assert not view.layers[0].is_moe and view.layers[1].is_moe


def test_intermediate_matches_the_experts_forward() -> None:
    """The down projection's input the statistics use is what the model's expert computes (gpt-oss:
    transposed, interleaved gate/up, biases, clamped gate)."""
    model = tiny_moe("gpt_oss")
    group = model_view(model).layers[0].experts[0]
    x = torch.randn(6, model.config.hidden_size)
    index = torch.full((6, 2), 2)
    index[:, 1] = 0
    weights = torch.tensor([[1.0, 0.0]] * 6)
    with torch.no_grad():
        out = group.module(x, index, weights)
        assert torch.allclose(out, group.expert_output(2, x), atol=1e-5)


class _Record(Method):
    """Keeps the statistics the engine hands a layer; prunes nothing."""

    name = "record"
    summary = "test only"

    def __init__(self, stats: str) -> None:
        super().__init__(Pattern(0.5), MethodOptions())
        self.stats = stats  # type: ignore[misc]
        self.seen: dict[int, dict[str, object]] = {}

    @property
    def sequential(self) -> str:  # type: ignore[override]
        return "layer"

    def prune_layer(self, ctx) -> dict:  # type: ignore[no-untyped-def]
        self.seen[ctx.layer.index] = dict(ctx.stats)
        return {}


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_one_experts_statistics_come_from_exactly_its_routed_tokens(model_type: str) -> None:
    model = tiny_moe(model_type)
    ids = torch.randint(0, 120, (2, 16))
    view = model_view(model)
    layer = view.layers[1]
    group = layer.experts[0]
    # Independent: the model's own router logits (output_router_logits) and the MoE block's input.
    block_in: list[torch.Tensor] = []
    handle = group.block.register_forward_pre_hook(lambda _m, args: block_in.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    handle.remove()
    logits = out.router_logits[1].reshape(-1, NUM_EXPERTS)
    x = block_in[0]
    topk = torch.topk(logits.float() if model_type == "gpt_oss" else logits.softmax(-1), 2, dim=-1).indices
    recorder = _Record("hessian")
    reports = run_layerwise(view, recorder, ids, device=torch.device("cpu"), batch_size=2)
    tokens = reports[1]["experts"][group.path]["tokens"]
    for e in range(NUM_EXPERTS):
        rows = (topk == e).any(-1)
        assert tokens[e] == int(rows.sum())
        xe = x[rows]
        gate_name, up_name, down_name = group.names(e)
        st = recorder.seen[1][up_name]
        assert st is recorder.seen[1][gate_name] and st.tokens == xe.shape[0]
        torch.testing.assert_close(st.hessian, xe.T @ xe, rtol=1e-4, atol=1e-4)
        # The down projection's input from the expert's own weights, written out for this family.
        w, b = group.module.gate_up_proj[e], (group.module.gate_up_proj_bias[e] if group.has_bias else 0)
        with torch.no_grad():
            if model_type == "gpt_oss":
                gu = xe @ w + b
                gate, up = gu[:, ::2].clamp(max=group.module.limit), gu[:, 1::2].clamp(-group.module.limit,
                                                                                       group.module.limit)
                h = (up + 1) * gate * torch.sigmoid(gate * group.module.alpha)
            else:
                gate, up = (xe @ w.T).chunk(2, dim=-1)
                h = nn.functional.silu(gate) * up
        torch.testing.assert_close(recorder.seen[1][down_name].hessian, h.T @ h, rtol=1e-4, atol=1e-4)
    assert sum(tokens) == ids.numel() * 2


def test_calib_moe_all_sends_every_token_and_unrouted_experts_fall_back() -> None:
    model = tiny_moe("qwen3_moe")
    view = model_view(model)
    ids = torch.randint(0, 120, (1, 16))
    recorder = _Record("sq_norm")
    run_layerwise(view, recorder, ids, device=torch.device("cpu"), moe_calib="all")
    group = view.layers[0].experts[0]
    assert all(recorder.seen[0][group.names(e)[0]].tokens == 16 for e in range(NUM_EXPERTS))
    # An expert the router never picks gets identity statistics (a router whose choice of 3 goes elsewhere).
    def never_three(_m, _args, out):  # type: ignore[no-untyped-def]
        logits, scores, index = out
        index = index.clone()
        for row in index:
            if (row == 3).any():
                row[row == 3] = next(e for e in range(3) if e not in row.tolist())
        return logits, scores, index

    handle = group.router.register_forward_hook(never_three)
    recorder = _Record("hessian")
    reports = run_layerwise(view, recorder, ids, device=torch.device("cpu"))
    handle.remove()
    rep = reports[0]["experts"][group.path]
    assert rep["tokens"][3] == 0 and rep["unrouted"] == [3] and "magnitude" in rep["fallback"]
    st = recorder.seen[0][group.names(3)[0]]
    assert st.tokens == 0 and torch.equal(st.hessian, torch.eye(st.in_features))
    with pytest.raises(LLMPruneError, match="calib.moe"):
        run_layerwise(view, recorder, ids, device=torch.device("cpu"), moe_calib="every")


def _prune(model: nn.Module, method: str, calib: Path, tmp: Path | None = None, **kw: object) -> llmprune.PruneResult:
    return llmprune.prune(model, tokenizer=ByteTokenizer(128), method=method, nsamples=4, seqlen=32,
                          calib_dataset=str(calib), output=None if tmp is None else str(tmp), **kw)


def _expert_zero_fraction(view) -> float:  # type: ignore[no-untyped-def]
    zeros = total = 0
    for layer in view.layers:
        for lin in layer.linears.values():
            if isinstance(lin, ExpertLinear):
                zeros += int((lin.weight == 0).sum())
                total += lin.weight.numel()
    return zeros / total


def test_every_supported_family_prunes_saves_and_reloads(supported: list[str], tmp_path: Path, calib_file: Path) -> None:
    for model_type in supported:
        model = tiny_moe(model_type)
        result = _prune(model, "wanda", calib_file, tmp_path / model_type, sparsity=0.5)
        view = model_view(model)
        assert _expert_zero_fraction(view) == 0.5, model_type
        assert result.report["moe"]["experts"] > 0
        reloaded = getattr(tf, moe_families()[model_type]).from_pretrained(tmp_path / model_type)
        for (name, p), q in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
            assert torch.equal(p, q), (model_type, name)
        with torch.no_grad():
            assert torch.isfinite(reloaded(input_ids=torch.randint(0, 120, (1, 12))).logits).all()


@pytest.mark.parametrize("model_type", CORE)
@pytest.mark.parametrize(("method", "kw"), [("magnitude", {"sparsity": 0.5}), ("wanda", {"pattern": "2:4"}),
                                            ("sparsegpt", {"sparsity": 0.5}), ("sparsegpt", {"pattern": "2:4"})])
def test_methods_reach_the_requested_sparsity_on_every_expert(model_type: str, method: str, kw: dict,
                                                              calib_file: Path) -> None:
    model = tiny_moe(model_type)
    result = _prune(model, method, calib_file, **kw)
    view = model_view(model)
    assert _expert_zero_fraction(view) == 0.5
    for layer in view.layers:
        for name, lin in layer.linears.items():
            w = lin.weight
            if "pattern" in kw:  # every expert matrix (and every other linear) is a valid 2:4
                assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all(), name
            elif isinstance(lin, ExpertLinear) and method != "magnitude":
                assert ((w == 0).sum(1) == w.shape[1] // 2).all() or method == "sparsegpt", name
    if "pattern" in kw:
        assert result.report["sparsity"]["nm_valid"] is True
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(0, 120, (1, 12))).logits).all()


def test_sequential_linear_prunes_experts_inside_the_forward(calib_file: Path) -> None:
    model = tiny_moe("mixtral")
    _prune(model, "wanda", calib_file, sparsity=0.5, method_options={"sequential": "linear"})
    assert _expert_zero_fraction(model_view(model)) == 0.5


def test_unknown_calib_moe_is_refused_before_work() -> None:
    with pytest.raises(LLMPruneError, match="calib.moe"):
        llmprune.prune(tiny_moe("mixtral"), tokenizer=ByteTokenizer(128), method="wanda", sparsity=0.5,
                       recipe={"calib": {"moe": "sometimes"}})


def test_docs_family_table_is_generated_and_the_readme_counts_it() -> None:
    from .moe_families import DOCS_PAGE, docs_region, family_counts, family_rows, family_table

    root = Path(__file__).resolve().parents[1]
    page = (root / DOCS_PAGE).read_text(encoding="utf-8")
    assert docs_region(page) == family_table(), f"{DOCS_PAGE} is out of date: run python -m tests.moe_families"
    counts = family_counts(family_rows())
    line = next(x for x in (root / "README.md").read_text(encoding="utf-8").splitlines() if "(docs/moe.md)" in x)
    assert f"{counts['supported']} of {sum(counts.values())} MoE families supported" in line
