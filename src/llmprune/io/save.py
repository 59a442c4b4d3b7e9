"""Write a pruned model, its tokenizer and ``llmprune.json`` atomically.

Everything is written into a temporary folder beside the destination and moved into place with
``os.replace``; an existing destination is only replaced with ``overwrite=True``, and then only
after the new folder is complete.

Temporary files and folders (``mkstemp``: 0600, ``mkdtemp``: 0700) are given the modes the user's
umask gives ordinary files (0666 & ~umask) and folders (0777 & ~umask) before they are moved into
place, so a saved run can be shared or published like any folder the user creates.
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
CARD_NAME = "README.md"  # the model card (llmprune.io.card)


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


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (``os.umask`` sets it, which
    races with other threads creating files); elsewhere set and restored at once."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike[str]) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes the umask gives new files
    (0666 & ~umask) and folders (0777 & ~umask): what ``open``/``mkdir`` would have given them."""
    mask = current_umask()
    root = Path(path)
    if not root.is_dir():
        os.chmod(root, 0o666 & ~mask)
        return
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            full = os.path.join(folder, name)
            if not os.path.islink(full):
                os.chmod(full, 0o666 & ~mask)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    path = check_parent(path, "file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_dir(tmp: Path, dest: Path) -> None:
    """Move the complete folder ``tmp`` to ``dest`` (beside it), replacing an existing ``dest`` only then.

    Its files and folders get the umask's modes first (``tmp`` may come from ``mkdtemp``)."""
    follow_umask(tmp)
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


def _cast_state(model: Any, dtype: Any) -> dict[str, Any]:
    """The model's state dict with floating tensors in ``dtype``; tensors that share storage (tied
    embeddings) stay shared, so ``save_pretrained`` still writes them once."""
    cast: dict[tuple[int, Any], Any] = {}
    out = {}
    for key, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            out[key] = tensor
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident not in cast:
            cast[ident] = tensor.to(dtype)
        out[key] = cast[ident]
    return out


def save_model(model: Any, folder: Path, dtype: Any = None) -> None:
    """``model.save_pretrained(folder)`` with the weights in ``dtype`` (a ``torch.dtype``; None: as they
    are), leaving the model in memory untouched (it keeps computing in its own precision)."""
    if dtype is None or getattr(model, "dtype", dtype) == dtype:
        model.save_pretrained(folder)
        return
    model.save_pretrained(folder, state_dict=_cast_state(model, dtype))
    config_path = folder / "config.json"  # save_pretrained writes the dtype of the model, not of the tensors
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["dtype"] = str(dtype).removeprefix("torch.")
    write_json_atomic(config_path, config)


def finish_folder(folder: Path, report: dict[str, Any], namer: Any = None) -> None:
    """Write the report (and the model card) into a run folder being built; with ``namer`` (an
    :class:`llmprune.io.public.PathNamer`) whole-value local paths in its config files are replaced."""
    from .card import card_text

    if namer is not None:
        from .public import scrub_folder

        scrub_folder(folder, namer)
    write_text_atomic(folder / CARD_NAME, card_text(report))
    write_json_atomic(folder / REPORT_NAME, report)


def save_run(model: Any, tokenizer: Any, report: dict[str, Any], output: str | os.PathLike[str], *, overwrite: bool,
             extra: Callable[[Path], Any] | None = None, dtype: Any = None, namer: Any = None) -> Path:
    """Save model (safetensors, in ``dtype`` when given), tokenizer and report; the model reloads with
    plain ``from_pretrained``.

    ``extra(folder)`` may write more files into the temporary folder before it is moved into place."""
    with staged_dir(output, overwrite=overwrite) as tmp:
        save_model(model, tmp, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        finish_folder(tmp, report, namer)
    return Path(output).expanduser()


def read_report(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / REPORT_NAME
    if not path.is_file():
        raise LLMPruneError(f"{folder} has no {REPORT_NAME}; it is not an llmprune run folder")
    return json.loads(path.read_text(encoding="utf-8"))
