"""The benchmark scripts refuse names they do not know before loading anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("flag", "value"), [("--methods", "wanda,wandda"), ("--barber-configs", "presets,reconstrut"),
                                             ("--peer-methods", "magnitude")])
def test_unstructured_benchmark_rejects_unknown_names(flag: str, value: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "unstructured.py"), flag, value,
                           "--output", str(tmp_path / "out.json"), "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"{flag}: unknown" in proc.stderr and "choose from" in proc.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "out.json").exists()
