"""Write a pruned model, its tokenizer and ``llmprune.json`` atomically.

Everything is written into a temporary folder beside the destination and moved into place with
``os.replace``; an existing destination is only replaced with ``overwrite=True``, and then only
after the new folder is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import LLMPruneError

REPORT_NAME = "llmprune.json"
SWEEP_NAME = "sweep.json"  # the index of a sweep folder (llmprune.sweeps)


def check_parent(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Fail clearly when ``path`` lies below an existing file (``out.json/run``): no folder can be made there."""
    path = Path(path).expanduser()
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise LLMPruneError(f"{what} {path} cannot be created: {parent} is a file, not a folder; "
                                    f"choose a path that is not inside a file")
            break
    return path


def check_output_dir(output: str | os.PathLike[str], overwrite: bool) -> Path:
    """Fail before any work if ``output`` cannot be written."""
    path = check_parent(output)
    if path.exists() and not overwrite:
        raise LLMPruneError(f"output folder {path} already exists; choose another --output or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise LLMPruneError(f"output {path} exists and is not a folder")
    parent = path.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise LLMPruneError(f"cannot write into {parent}")
    return path


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    path = check_parent(path, "file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=False, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_dir(tmp: Path, dest: Path) -> None:
    """Move the complete folder ``tmp`` to ``dest`` (beside it), replacing an existing ``dest`` only then."""
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.resolve().parent, prefix=f".{dest.name}.old-"))
        os.replace(dest, old / "previous")
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


@contextlib.contextmanager
def staged_dir(output: str | os.PathLike[str], *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``output``; when the block succeeds it replaces ``output``.

    An existing ``output`` is refused unless ``overwrite``, and is only replaced once the new folder
    is complete; if the block raises, nothing is left behind and ``output`` is untouched.
    """
    dest = check_output_dir(output, overwrite)
    tmp = Path(tempfile.mkdtemp(dir=dest.resolve().parent, prefix=f".{dest.name}.tmp-"))
    try:
        yield tmp
        install_dir(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_run(model: Any, tokenizer: Any, report: dict[str, Any], output: str | os.PathLike[str], *, overwrite: bool,
             extra: Callable[[Path], Any] | None = None) -> Path:
    """Save model (safetensors), tokenizer and report; the model reloads with plain ``from_pretrained``.

    ``extra(folder)`` may write more files into the temporary folder before it is moved into place."""
    with staged_dir(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        write_json_atomic(tmp / REPORT_NAME, report)
    return Path(output).expanduser()


def read_report(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / REPORT_NAME
    if not path.is_file():
        raise LLMPruneError(f"{folder} has no {REPORT_NAME}; it is not an llmprune run folder")
    return json.loads(path.read_text(encoding="utf-8"))
