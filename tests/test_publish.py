"""Run folders a user can publish: file modes, saved dtype, no local paths, model card, re-running."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import llmprune
from llmprune.io.save import current_umask, staged_dir, write_json_atomic


@pytest.fixture
def umask() -> Iterator[int]:
    """Run the test under umask 027 (files 0640, folders 0750), restoring the caller's."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_current_umask_reads_without_changing(umask: int) -> None:
    assert current_umask() == umask
    assert current_umask() == umask


def test_saved_folder_and_report_follow_umask(umask: int, tiny_model_dir, tmp_path: Path) -> None:
    out = tmp_path / "run"
    llmprune.prune(str(tiny_model_dir("llama")), method="magnitude", sparsity=0.5, output=str(out))
    assert _mode(out) == 0o750
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"llmprune.json", "config.json", "model.safetensors"}
    for path in files:
        assert _mode(path) == 0o640, path
    for path in (p for p in out.rglob("*") if p.is_dir()):
        assert _mode(path) == 0o750, path
    # Replacing it keeps the modes too (the new folder comes from mkdtemp as well).
    llmprune.prune(str(tiny_model_dir("llama")), method="magnitude", sparsity=0.3, output=str(out), overwrite=True)
    assert _mode(out) == 0o750 and _mode(out / "llmprune.json") == 0o640


def test_atomic_helpers_follow_umask(umask: int, tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert _mode(tmp_path / "a.json") == 0o640
    with staged_dir(tmp_path / "staged", overwrite=False) as tmp:
        (tmp / "sub").mkdir()
        write_json_atomic(tmp / "sub" / "b.json", {})
    assert _mode(tmp_path / "staged") == 0o750 and _mode(tmp_path / "staged" / "sub") == 0o750
    assert _mode(tmp_path / "staged" / "sub" / "b.json") == 0o640
    os.umask(0o077)  # a private umask is followed as well
    write_json_atomic(tmp_path / "c.json", {})
    assert _mode(tmp_path / "c.json") == 0o600
