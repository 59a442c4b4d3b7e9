"""Data sources, calibration sampling and the evaluation stream, on the local mirror."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmprune.data.sources import read_documents, resolve
from llmprune.data.tokens import calibration_windows, evaluation_tokens
from llmprune.errors import LLMPruneError

from .conftest import ByteTokenizer


def test_wikitext_test_split_matches_the_hub_rows(data_dir: Path) -> None:
    src = resolve("wikitext2", "evaluation", str(data_dir))
    assert src.split == "test" and src.origin == "local"
    docs = read_documents(src)
    assert len(docs) == 4358
    assert docs[0] == "" and docs[1] == " = Robert Boulter = \n"


def test_env_var_selects_the_mirror(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMPRUNE_DATA_DIR", str(data_dir))
    assert resolve("wikitext2", "evaluation", None).origin == "local"
    monkeypatch.delenv("LLMPRUNE_DATA_DIR")
    assert resolve("wikitext2", "evaluation", None).origin == "hub"


def test_c4_calibration_and_evaluation_never_overlap(data_dir: Path) -> None:
    calib = resolve("c4", "calibration", str(data_dir))
    evals = resolve("c4", "evaluation", str(data_dir))
    assert calib.key != evals.key
    a, b = read_documents(calib), read_documents(evals)
    assert len(a) == len(b) == 500 and not set(a) & set(b)


def test_calibration_is_seeded_and_shaped(data_dir: Path) -> None:
    tok = ByteTokenizer()
    src = resolve("c4", "calibration", str(data_dir))
    one = calibration_windows(tok, src, 4, 64, seed=0)
    two = calibration_windows(tok, src, 4, 64, seed=0)
    other = calibration_windows(tok, src, 4, 64, seed=1)
    assert one.shape == (4, 64) and one.dtype == torch.long
    assert torch.equal(one, two) and not torch.equal(one, other)


def test_wikitext_calibration_falls_back_to_validation(data_dir: Path) -> None:
    src = resolve("wikitext2", "calibration", str(data_dir))
    assert src.split == "validation"  # the mirror has no train split


def test_local_files(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    txt = tmp_path / "a.txt"
    txt.write_text("hello world " * 50)
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"document {i} " * 20}) for i in range(5)))
    for path in (txt, jsonl):
        src = resolve(str(path), "calibration", None)
        ids = calibration_windows(tok, src, 3, 16, seed=0)
        assert ids.shape == (3, 16)
    stream = evaluation_tokens(tok, resolve(str(txt), "evaluation", None))
    assert stream.numel() == len(("hello world " * 50).encode())


def test_calibration_shorter_than_one_window_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("too short")
    with pytest.raises(LLMPruneError, match="shorter than one window"):
        calibration_windows(ByteTokenizer(), resolve(str(path), "calibration", None), 2, 64, seed=0)


@pytest.mark.parametrize(
    ("dataset", "data_dir", "message"),
    [
        ("nope", None, "neither wikitext2 nor c4"),
        ("wikitext2:dev", None, "splits"),
        ("c4", "/definitely/missing", "does not exist"),
    ],
)
def test_bad_datasets(dataset: str, data_dir: str | None, message: str) -> None:
    with pytest.raises(LLMPruneError, match=message):
        resolve(dataset, "calibration", data_dir)


def test_bad_file_types(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("x")
    with pytest.raises(LLMPruneError, match="unsupported file type"):
        resolve(str(path), "calibration", None)
