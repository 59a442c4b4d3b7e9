"""The benchmark scripts refuse names they do not know before loading anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import save_tiny

REPO = Path(__file__).resolve().parents[1]


def unstructured(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """``benchmarks/unstructured.py`` with ``args``, as a user runs it."""
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "unstructured.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


@pytest.mark.parametrize(("flag", "value"), [("--methods", "wanda,wandda"), ("--barber-configs", "presets,reconstrut"),
                                             ("--barber-inits", "wanda,magnitud"), ("--peer-methods", "magnitude"),
                                             ("--sweep-granularities", "layer,blok"), ("--sweep-ratios", "0.1,0.2"),
                                             ("--allocations", "uniform,owll"), ("--reconstructs", "none,exat"),
                                             ("--peer-profiles", "owl,layerwise")])
def test_unstructured_benchmark_rejects_unknown_names(flag: str, value: str, tmp_path: Path) -> None:
    proc = unstructured(flag, value, "--output", str(tmp_path / "out.json"), "--workdir", str(tmp_path / "work"),
                        timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"{flag}: unknown" in proc.stderr and "choose from" in proc.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "out.json").exists()


def test_unstructured_benchmark_resume_refuses_another_processor(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    out.write_text('{"protocol": {}, "versions": {"cpu": "a processor that is not this one"}, "runs": []}')
    before = out.read_bytes()
    proc = unstructured("--resume", "--no-peer", "--output", str(out), "--workdir", str(tmp_path / "work"), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "--resume" in proc.stderr and "another processor (a processor that is not this one" in proc.stderr
    assert out.read_bytes() == before and not (tmp_path / "work").exists()


def test_unstructured_benchmark_resume_refuses_another_protocol(tmp_path: Path) -> None:
    from llmprune.report import versions

    out = tmp_path / "out.json"
    out.write_text(json.dumps({"protocol": {"calibration": "another"}, "versions": {"cpu": versions()["cpu"]},
                               "runs": [{"kept": True}]}))
    before = out.read_bytes()
    # A tiny local model: the refusal comes once the protocol is known, i.e. after the data is read.
    proc = unstructured("--resume", "--no-peer", "--model", str(save_tiny(tmp_path / "model")), "--nsamples", "1",
                        "--seqlen", "16", "--output", str(out), "--workdir", str(tmp_path / "work"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "--resume" in proc.stderr and "another protocol" in proc.stderr
    assert out.read_bytes() == before


def test_unstructured_benchmark_resume_keeps_the_files_notes(tmp_path: Path) -> None:
    """Notes written into a results file (which rows shared the CPU, which were stopped) stay with its
    rows when ``--resume`` adds more."""
    out = tmp_path / "out.json"
    args = ["--no-peer", "--model", str(save_tiny(tmp_path / "model")), "--methods", "magnitude", "--patterns",
            "unstructured", "--nsamples", "1", "--seqlen", "16", "--eval-windows", "1", "--output", str(out),
            "--workdir", str(tmp_path / "work")]
    first = unstructured(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    data = json.loads(out.read_text())
    data["notes"] = ["the magnitude row shared the CPU"]
    out.write_text(json.dumps(data))
    again = unstructured(*args, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads(out.read_text())
    assert resumed["notes"] == ["the magnitude row shared the CPU"]
    assert resumed["runs"] == data["runs"] and len(resumed["commands"]) == 2


def test_unstructured_benchmark_runs_only_the_sweep_cells_asked(tmp_path: Path) -> None:
    """``--sweep-granularities`` and ``--sweep-ratios`` restrict ``--barber-sweep`` to those cells (how a
    sweep begun on another processor, where ``--resume`` is refused, is finished in a file of its own)."""
    out = tmp_path / "out.json"
    proc = unstructured("--no-peer", "--model", str(save_tiny(tmp_path / "model")), "--methods", "wanda", "--patterns",
                        "2:4", "--barber-sweep", "--sweep-granularities", "block,layer", "--sweep-ratios", "0.1",
                        "--nsamples", "1", "--seqlen", "16", "--eval-windows", "1", "--output", str(out),
                        "--workdir", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [(r["method"], r["request"].get("granularity"), r["request"].get("ratio"))
            for r in json.loads(out.read_text())["runs"]]
    assert runs == [("wanda", None, None), ("barber", "layer", 0.1), ("barber", "block", 0.1)]


def test_unstructured_benchmark_barber_ratios_select_the_runs(tmp_path: Path) -> None:
    """``--barber-ratios`` keeps only the Barber runs with those ratios; a value that is not a number is
    refused before any work."""
    bad = unstructured("--barber-ratios", "0.1,abc", "--output", str(tmp_path / "bad.json"), timeout=120)
    assert bad.returncode == 2 and "--barber-ratios: '0.1,abc' is not a comma-separated list" in bad.stderr
    assert not (tmp_path / "bad.json").exists()
    out = tmp_path / "out.json"
    proc = unstructured("--no-peer", "--model", str(save_tiny(tmp_path / "model")), "--methods", "barber", "--patterns",
                        "2:4", "--barber-configs", "extras,reconstruct", "--barber-inits", "wanda", "--barber-ratios",
                        "0.01", "--nsamples", "1", "--seqlen", "16", "--eval-windows", "1", "--output", str(out),
                        "--workdir", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [(r["method"], r["request"].get("init"), r["request"].get("ratio"), r["request"].get("reconstruct"))
            for r in json.loads(out.read_text())["runs"]]
    assert runs == [("barber", "wanda", 0.01, True)]


def test_recovery_benchmark_resume_refuses_another_protocol(tmp_path: Path) -> None:
    """Rows trained on other text (or any other setting but the variants) are not resumed into."""
    out = tmp_path / "out.json"
    protocol = {"prune": {}, "recover": {"train_dataset": "c4", "variants": {}}, "eval": {}}
    out.write_text(json.dumps({"protocol": protocol, "runs": []}))
    before = out.read_bytes()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "recovery.py"), "--resume", "--output", str(out),
                           "--train-dataset", "wikitext2:validation", "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--resume" in proc.stderr and "another protocol" in proc.stderr
    assert out.read_bytes() == before and not (tmp_path / "work").exists()
