"""Zero-shot evaluation through lm-eval: the shipped offline task, real accuracy on tiny models, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import llmprune
from llmprune.cli import app
from llmprune.errors import LLMPruneError
from llmprune.eval.zeroshot import OFFLINE_TASK, PAPER_TASKS, cloze_items, parse_tasks

from .conftest import byte_level_tokenizer, tiny_model

pytest.importorskip("lm_eval")
runner = CliRunner()

ROWS = [
    " = A heading = \n",
    " The river flows past the old mill and into the quiet valley below the hills . The miller grinds "
    "wheat every morning before the market opens in the town square . Farmers bring their grain from "
    "distant fields along the winding roads . \n",
    "",
    " Children play near the water while their parents talk about the weather and the coming harvest "
    "season . Everyone agrees that the summer has been unusually warm this year . \n",
]


def test_cloze_items_are_deterministic_and_well_formed() -> None:
    items = cloze_items(ROWS, n_items=10, seed=0)
    assert items == cloze_items(ROWS, n_items=10, seed=0)
    answers = {"hills", "square", "roads", "season", "year"}
    assert len(items) == 5  # every sentence of 8+ words ending in a lowercase word of 4+ letters
    for item in items:
        assert len(item["choices"]) == 4 == len(set(item["choices"]))
        assert item["choices"][item["label"]] in answers
        assert not item["context"].endswith(item["choices"][item["label"]])
        assert " ." not in item["context"]  # WikiText spacing undone
    # Distractors come from the same paragraph as the answer.
    para = ROWS[1].split()
    first = items[0]
    assert all(choice in para for choice in first["choices"])
    with pytest.raises(LLMPruneError, match="too little text"):
        cloze_items([" = only a heading = "])


def test_parse_tasks() -> None:
    assert parse_tasks("offline") == [OFFLINE_TASK]
    assert parse_tasks("paper") == list(PAPER_TASKS)
    assert parse_tasks(None) == list(PAPER_TASKS)
    assert parse_tasks("boolq, offline,boolq") == ["boolq", OFFLINE_TASK]
    with pytest.raises(LLMPruneError, match="no zero-shot task"):
        parse_tasks(" , ")


def _loglik(model: torch.nn.Module, tok, context: str, continuation: str) -> float:
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def test_offline_task_accuracy_matches_an_independent_computation(data_dir: Path) -> None:
    """lm-eval's accuracy on the shipped task equals argmax log-likelihood computed here by hand."""
    model = tiny_model("llama", vocab_size=257, max_position_embeddings=1024)
    tok = byte_level_tokenizer()
    limit = 24
    rep = llmprune.evaluate(model, tokenizer=tok, tasks="offline", limit=limit, data_dir=str(data_dir), batch_size=4)
    res = rep["zeroshot"]["tasks"][OFFLINE_TASK]
    items_file = Path(res["data"]["items_file"])
    items = [json.loads(line) for line in items_file.read_text().splitlines()][:limit]
    correct = correct_norm = 0
    for item in items:
        lls = [_loglik(model, tok, item["context"], " " + c) for c in item["choices"]]
        norm = [ll / len(c) for ll, c in zip(lls, item["choices"], strict=True)]
        correct += int(max(range(4), key=lambda i: lls[i]) == item["label"])
        correct_norm += int(max(range(4), key=lambda i: norm[i]) == item["label"])
    assert res["samples"] == limit and res["version"] == "1.0"
    assert res["acc"] == pytest.approx(correct / limit)
    assert res["acc_norm"] == pytest.approx(correct_norm / limit)
    assert rep["zeroshot"]["mean"]["acc"] == res["acc"]
    assert rep["zeroshot"]["settings"] == {"num_fewshot": 0, "limit": limit, "batch_size": 4, "seed": 0}
    assert rep["zeroshot"]["versions"]["lm_eval"]
    assert res["data"]["split"] == "test" and res["data"]["items"] == 500
    assert "eval" not in rep  # no perplexity unless asked


def test_prune_with_tasks_records_dense_and_pruned_accuracy(tiny_model_dir, calib_file: Path, data_dir: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = llmprune.prune(str(tiny_model_dir("qwen2")), method="magnitude", sparsity=0.5, tasks="offline", limit=8,
                         data_dir=str(data_dir), output=str(out))
    saved = json.loads((out / "llmprune.json").read_text())
    assert saved["zeroshot"] == res.report["zeroshot"]
    assert saved["zeroshot"]["tasks"][OFFLINE_TASK]["samples"] == 8
    assert saved["zeroshot_dense"]["tasks"][OFFLINE_TASK]["samples"] == 8
    assert saved["recipe"]["eval"]["tasks"] == ["offline"] and saved["recipe"]["eval"]["limit"] == 8
    assert saved["timings"]["zeroshot_s"] > 0 and "lm_eval" in saved["versions"]


def test_cli_eval_tasks_json(tiny_model_dir, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "zs.json"
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir("llama")), "--tasks", "offline", "--limit", "6",
                                 "--data-dir", str(data_dir), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert OFFLINE_TASK in result.output and "acc_norm" in result.output
    rep = json.loads(out.read_text())
    assert set(rep["zeroshot"]["tasks"]) == {OFFLINE_TASK}


def test_unknown_task_fails_before_loading_the_model(data_dir: Path, tmp_path: Path) -> None:
    missing_model = tmp_path / "no-such-model"
    with pytest.raises(LLMPruneError, match=r"unknown lm-eval task 'hellaswagg' \(did you mean hellaswag"):
        llmprune.evaluate(str(missing_model), tasks="hellaswagg", data_dir=str(data_dir))
    result = runner.invoke(app, ["prune", "--model", str(missing_model), "--method", "magnitude", "--sparsity", "0.5",
                                 "--tasks", "offline,boolqq", "--data-dir", str(data_dir)])
    assert result.exit_code == 2 and "unknown lm-eval task" in result.output


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tasks": "offline", "limit": 0}, "limit"),
    ({"tasks": "offline", "include_path": "/no/such/folder"}, "include-path"),
])
def test_bad_zero_shot_settings(kwargs: dict, message: str, data_dir: Path) -> None:
    with pytest.raises(LLMPruneError, match=message):
        llmprune.evaluate(tiny_model("llama", vocab_size=257), tokenizer=byte_level_tokenizer(), data_dir=str(data_dir),
                          **kwargs)
