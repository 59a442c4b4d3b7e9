"""The README's quick start, run as written: its commands, its Python block, and the output it shows.

The commands are read from the README (not copied here), run in a fresh folder on the real
SmolLM2-135M, and the output block is checked against what they print: the plan line word for
word, every perplexity to 0.2% (another CPU rounds differently). A README edited without being
re-run fails here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmprune import cli
from llmprune.cli import app

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"
runner = CliRunner()


def quick_start() -> tuple[list[list[str]], str, str]:
    """(commands, shown output, Python block) of the README's quick start and "Using the result"."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    bash = re.search(r"```bash\n(.*?)```", section, re.S)
    shown = re.search(r"```text\n(.*?)```", section, re.S)
    using = text.split("## Using the result", 1)[1].split("\n## ", 1)[0]
    python = re.search(r"```python\n(.*?)```", using, re.S)
    assert bash and shown and python, "the README's quick start lost its bash, text or python block"
    commands = [shlex.split(line) for line in bash.group(1).replace("\\\n", " ").splitlines() if line.strip()]
    assert all(c[0] == "llmprune" for c in commands), commands
    return commands, shown.group(1), python.group(1)


def _segments(shown: str) -> dict[str, str]:
    """The shown output, per command: {"prune": "...", "eval": "...", "report": "..."}."""
    parts = re.split(r"^\$ llmprune (\w+) .*$", shown, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def _row(block: str, first: str) -> list[str]:
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in\n{block}")


def _close(shown: str, value: float) -> bool:
    return abs(float(shown) - value) <= 2e-3 * value


def test_readme_quick_start_runs_as_shown(smollm2, data_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    commands, shown, python = quick_start()
    assert [c[1] for c in commands] == ["prune", "eval", "report"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMPRUNE_DATA_DIR", str(data_dir))  # what make test sets; the README relies on it
    for console in (cli.console, cli.err):
        monkeypatch.setattr(console, "_width", 100)
    outputs = {}
    for command in commands:
        res = runner.invoke(app, command[1:])
        assert res.exit_code == 0, (command, res.output)
        outputs[command[1]] = res.output
    seg = _segments(shown)
    plan = next(line for line in seg["prune"].splitlines() if line.startswith("plan:"))
    assert plan in outputs["prune"].splitlines(), (plan, outputs["prune"])

    run = json.loads((tmp_path / "runs" / "wanda50" / "llmprune.json").read_text())
    dense, pruned = run["eval_dense"]["wikitext2"]["ppl"], run["eval"]["wikitext2"]["ppl"]
    row = _row(seg["prune"], "wikitext2")
    assert _close(row[-2], dense) and _close(row[-1], pruned), (row, dense, pruned)
    assert _row(seg["prune"], "sparsity (weights of the decoder linears)")[1] == f"{run['sparsity']['overall']:.4f}"

    for dataset in ("wikitext2", "c4"):
        shown_ppl = _row(seg["eval"], dataset)[-1]
        real = _row(outputs["eval"], dataset)[-1]
        assert _close(shown_ppl, float(real)), (dataset, shown_ppl, real)
    assert _close(_row(seg["report"], "wanda50")[3], pruned)
    assert (tmp_path / "runs" / "report" / "report.md").is_file()

    for folder in ("runs/wanda50", "runs/report"):  # the files the README says each folder holds
        sentence = re.search(rf"`{folder}/` (is|holds) (.*?)\. ", README.read_text(encoding="utf-8"), re.S)
        assert sentence, folder
        names = [n for n in re.findall(r"`([\w.-]+\.\w+)`", sentence.group(2))]
        assert names, folder
        for name in names:
            assert (tmp_path / folder / name).is_file(), (folder, name)
    exec(compile(python, "README.md", "exec"), {})  # the "Using the result" block loads the run folder
