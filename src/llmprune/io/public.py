"""No absolute local paths in what a run folder publishes.

A report is built with the paths of the machine it ran on (the model folder, the calibration file,
the data mirror, the output). Before it is written, :func:`public_report` replaces each with a
name that means the same thing anywhere:

- the model: its stable name from :func:`llmprune.io.provenance.describe_source` (the built-in
  name, the Hub id, a local folder's or ``.gguf`` file's name);
- a file in the data mirror (``--data-dir`` / ``LLMPRUNE_DATA_DIR``): its path inside the mirror
  (``wikitext-2-raw-v1/test-00000-of-00001.parquet``), the mirror being the Hub's layout;
- any other local path (a calibration ``.txt``, an lm-eval include folder): its file name;
- the recipe's ``data_dir`` and ``output`` are dropped (they name this machine's folders; a re-run
  gives its own), ``overwrite`` is reset.

What reproduces the run stays: every setting, dataset names and splits, document ranges and the
SHA-256 of the calibration tokens, with which a re-run on other files can be checked. The other
JSON files of the folder (``config.json``, ``generation_config.json``, ``adapter_config.json``)
get the same treatment for values that are a whole absolute path (:func:`scrub_folder`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

# An absolute POSIX path (or ~/...) inside a string: one that starts the string or follows a space,
# quote, bracket or '=' (not a URL's '//' nor a relative path's inner '/').
_ABS_PATH = re.compile(r"(?<![\w:/.~-])~?/[^\s'\"()<>\[\],;]+")
_SCRUBBED_FILES = ("config.json", "generation_config.json", "adapter_config.json", "tokenizer_config.json",
                   "special_tokens_map.json", "preprocessor_config.json")


class PathNamer:
    """Turns local paths into public names (module docstring)."""

    def __init__(self, roots: dict[str, str] | None = None, data_dir: str | os.PathLike[str] | None = None) -> None:
        # roots: local path -> the public name that replaces it (and its prefix in paths under it)
        self.roots = {self._norm(k): v for k, v in (roots or {}).items() if k}
        self.data_dir = self._norm(data_dir) if data_dir else None

    @staticmethod
    def _norm(path: str | os.PathLike[str]) -> str:
        return os.path.normpath(os.path.abspath(os.path.expanduser(str(path))))

    def name(self, path: str) -> str:
        full = self._norm(path)
        for root, public in sorted(self.roots.items(), key=lambda kv: -len(kv[0])):
            if full == root:
                return public
            if full.startswith(root + os.sep):
                return f"{public}/{os.path.relpath(full, root)}"
        if self.data_dir and full.startswith(self.data_dir + os.sep):
            return os.path.relpath(full, self.data_dir).replace(os.sep, "/")
        return os.path.basename(full) or full

    def text(self, value: str) -> str:
        """``value`` with every absolute path in it replaced."""
        return _ABS_PATH.sub(lambda m: self.name(m.group(0)), value)

    def walk(self, data: Any, text: Callable[[str], str] | None = None) -> Any:
        fix = text or self.text
        if isinstance(data, dict):
            return {fix(k) if isinstance(k, str) else k: self.walk(v, fix) for k, v in data.items()}
        if isinstance(data, list):
            return [self.walk(v, fix) for v in data]
        if isinstance(data, str):
            return fix(data)
        return data

    def whole(self, value: str) -> str:
        """``value`` replaced only when all of it is one absolute path (configs: a token is no path)."""
        return self.name(value) if _ABS_PATH.fullmatch(value) else value


def namer_for(source: dict[str, Any], data_dir: str | None) -> PathNamer:
    """The namer of a run: its model's local location (when it has one) becomes its public name."""
    from ..data.sources import resolve_data_dir

    roots: dict[str, str] = {}
    if source.get("location"):
        roots[str(source["location"])] = str(source["name"])
    try:
        mirror = resolve_data_dir(data_dir)
    except Exception:  # checked before the run; a mirror removed since is just not named
        mirror = None
    return PathNamer(roots, mirror)


def public_recipe(recipe: dict[str, Any], source: dict[str, Any], namer: PathNamer) -> dict[str, Any]:
    out = json.loads(json.dumps(recipe, default=str))
    if "model" in out and source.get("kind") != "in-memory":
        out["model"]["name"] = source["name"]
    for key in ("data_dir", "output"):
        if key in out:
            out[key] = None
    if "overwrite" in out:
        out["overwrite"] = False
    return namer.walk(out)  # type: ignore[no-any-return]


def public_report(report: dict[str, Any], source: dict[str, Any], data_dir: str | None) -> dict[str, Any]:
    """``report`` as a run folder publishes it: no local paths (module docstring). ``source`` is the
    run's :func:`~llmprune.io.provenance.describe_source` plus its local ``location``; the published
    ``source`` section leaves the location out."""
    namer = namer_for(source, data_dir)
    out = dict(report)
    if source.get("kind") != "in-memory":
        out["model"] = source["name"]
    if isinstance(out.get("recipe"), dict):
        out["recipe"] = public_recipe(out["recipe"], source, namer)
    out["source"] = {k: v for k, v in source.items() if k != "location"}
    return namer.walk(out)  # type: ignore[no-any-return]


def scrub_folder(folder: Path, namer: PathNamer) -> None:
    """Replace whole-value absolute paths in the folder's small JSON files (not the tokenizer's vocabulary)."""
    from .save import write_json_atomic

    for name in _SCRUBBED_FILES:
        for path in folder.rglob(name):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            fixed = namer.walk(data, namer.whole)
            if fixed != data:
                write_json_atomic(path, fixed)
