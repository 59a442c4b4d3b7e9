"""Contract tests: every supported family is understood by introspection alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmprune.errors import LLMPruneError
from llmprune.models.roles import Role
from llmprune.models.view import check_not_tied, model_view

from .conftest import FAMILIES, SLIDING, make_config, tiny_model


def test_view_finds_layers_roles_and_shapes(family: str) -> None:
    model = tiny_model(family)
    view = model_view(model)
    config = model.config
    assert len(view.layers) == config.num_hidden_layers
    for layer in view.layers:
        roles = set(layer.roles.values())
        assert roles == {Role.ATTN_IN, Role.ATTN_OUT, Role.MLP_IN, Role.MLP_OUT}
        # Every nn.Linear of the block is classified, none twice.
        linears = [m for m in layer.module.modules() if isinstance(m, nn.Linear)]
        assert len(linears) == len(layer.linears)
        hidden = config.hidden_size
        for lin in layer.by_role(Role.ATTN_IN).values():
            assert lin.in_features == hidden
        for lin in layer.by_role(Role.MLP_OUT).values():
            assert lin.out_features == hidden
        mlp_in_out = {lin.out_features for lin in layer.by_role(Role.MLP_IN).values()}
        mlp_out_in = {lin.in_features for lin in layer.by_role(Role.MLP_OUT).values()}
        # gate/up feed down (a fused gate_up has twice the width).
        assert mlp_out_in <= mlp_in_out or {2 * w for w in mlp_out_in} <= mlp_in_out
    desc = view.describe()
    assert desc["num_layers"] == config.num_hidden_layers


@pytest.mark.parametrize("family", SLIDING)
def test_attention_types_match_config(family: str) -> None:
    model = tiny_model(family)
    view = model_view(model)
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types is not None:
        assert [layer.attention_type for layer in view.layers] == list(layer_types)
    if family in ("gemma2", "gemma3", "qwen2"):
        assert "sliding_attention" in {layer.attention_type for layer in view.layers}


def test_sub_blocks_found_by_role(family: str) -> None:
    view = model_view(tiny_model(family))
    layer = view.layers[0]
    assert layer.sub_block("attn") is not None
    if family == "opt":
        assert layer.sub_block("mlp") is None  # fc1/fc2 live directly in the OPT layer
    else:
        assert layer.sub_block("mlp") is not None


def test_unknown_layout_error_shows_what_was_found() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mystery = nn.Linear(4, 4)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

    with pytest.raises(LLMPruneError, match="mystery"):
        model_view(Net())

    with pytest.raises(LLMPruneError, match="could not find the decoder layers"):
        model_view(nn.Sequential(nn.Linear(2, 2)))


def test_tied_decoder_weight_is_refused() -> None:
    model = tiny_model("llama")
    view = model_view(model)
    # Tie one decoder linear to a module outside the layers: pruning it would prune that module too.
    model.extra = nn.Linear(64, 64, bias=False)
    model.extra.weight = view.layers[0].linears["self_attn.q_proj"].weight
    with pytest.raises(LLMPruneError, match="tied"):
        check_not_tied(model_view(model))


def test_families_cover_the_issue_list() -> None:
    assert {"llama", "mistral", "qwen2", "qwen3", "opt", "phi3"} <= set(FAMILIES)
    assert {"gemma2", "gemma3"} & set(FAMILIES)
    cfg = make_config("gemma2")
    assert cfg.sliding_window < 32  # shorter than the sequence lengths the engine tests use
    assert torch.is_tensor(tiny_model("opt").model.decoder.project_in.weight)  # the project_in variant
