"""The benchmark tables in README.md and docs/ are what benchmarks/tables.py makes of the checked-in
result files, and bad input to it fails with the file named."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("llmprune_bench_tables", REPO / "benchmarks" / "tables.py")
tables = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tables  # dataclasses look their module up while the class is built
_spec.loader.exec_module(tables)

RUN = {"tool": "llmprune", "method": "wanda", "pattern": "unstructured", "options": {}, "prune_s": 10.0,
       "peak_rss_mb": 900.0, "wikitext2": {"ppl": 50.0, "seqlen": 2048, "windows": 4}}
PROTOCOL = {"calibration": {"dataset": "c4", "split": "validation", "nsamples": 8, "seqlen": 256, "seed": 0},
            "evaluation": {"dataset": "wikitext2", "split": "test", "seqlen": 2048, "windows": 4},
            "dtype": "float32", "device": "cpu", "threads": 2}


def results_dir(tmp_path: Path, files: dict[str, dict], index: str) -> Path:
    root = tmp_path / "results"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(data))
    (root / "index.yaml").write_text(index)
    return root


def test_checked_in_tables_are_what_the_result_files_give() -> None:
    changed = tables.regenerate(tables.markdown_files(), tables.load_index())
    assert not changed, f"stale generated tables in {sorted(str(p.relative_to(REPO)) for p in changed)}: run `make tables`"


def test_every_region_names_a_table_and_the_readme_has_the_headline() -> None:
    names = {m.group("name") for path in tables.markdown_files() if path.is_file()
             for m in tables.REGION.finditer(path.read_text())}
    assert "headline" in {m.group("name") for m in tables.REGION.finditer((REPO / "README.md").read_text())}
    specs = tables.load_index()
    assert names - set(specs) <= {n for n in names if n.startswith("options/") or n in tables.GENERATED}


def test_a_stale_region_is_rewritten_from_the_result_file(tmp_path: Path) -> None:
    root = results_dir(tmp_path, {"a/run.json": {"benchmark": "unstructured", "model": "tiny", "protocol": PROTOCOL,
                                                 "runs": [RUN]}},
                       "tables:\n  - table: t\n    files: a/run.json\n")
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- table:t -->\n| typed | by hand |\n<!-- /table -->\nend\n")
    changed = tables.regenerate([page], tables.load_index(root / "index.yaml"))
    text = changed[page]
    assert "| Wanda | 50.000 | 10.0 |" in text and "typed" not in text
    assert "calibration: c4 validation, 8 x 256 tokens" in text and "first 4 windows" in text
    assert "processor not recorded in the file" in text and text.startswith("intro\n") and text.endswith("end\n")
    page.write_text(text)
    assert not tables.regenerate([page], tables.load_index(root / "index.yaml"))


def test_a_result_file_without_its_protocol_is_named(tmp_path: Path) -> None:
    root = results_dir(tmp_path, {"a/noproto.json": {"benchmark": "unstructured", "model": "tiny", "runs": [RUN]}},
                       "tables:\n  - table: t\n    files: a/noproto.json\n")
    specs = tables.load_index(root / "index.yaml")
    with pytest.raises(tables.TableError, match=r"a/noproto.json: no protocol.*'protocol'"):
        tables.render(specs["t"])


def test_a_table_claimed_twice_names_both_files(tmp_path: Path) -> None:
    data = {"benchmark": "unstructured", "model": "tiny", "protocol": PROTOCOL, "runs": [RUN]}
    root = results_dir(tmp_path, {"a/one.json": data, "b/two.json": data},
                       "tables:\n  - table: t\n    files: a/one.json\n  - table: t\n    files: b/two.json\n")
    with pytest.raises(tables.TableError, match=r"table 't' is claimed by b/two.json and by a/one.json"):
        tables.load_index(root / "index.yaml")


def test_a_result_file_missing_from_the_index_is_named(tmp_path: Path) -> None:
    data = {"benchmark": "unstructured", "model": "tiny", "protocol": PROTOCOL, "runs": [RUN]}
    root = results_dir(tmp_path, {"a/one.json": data, "a/stray.json": data},
                       "tables:\n  - table: t\n    files: a/one.json\n")
    with pytest.raises(tables.TableError, match=r"a/stray.json: result file not in index.yaml"):
        tables.load_index(root / "index.yaml")


def test_a_region_naming_no_table_is_an_error(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- table:nosuch -->\n<!-- /table -->\n")
    with pytest.raises(tables.TableError, match=r"page.md: region table:nosuch names no table"):
        tables.regenerate([page], {})


def test_option_tables_list_every_registered_option_with_its_default() -> None:
    from llmprune.methods import METHODS

    text = tables.build_options("barber")
    for name, field in METHODS.get("barber").Options.model_fields.items():
        assert f"| `{name}` |" in text and f"`{field.default!r}`" in text
