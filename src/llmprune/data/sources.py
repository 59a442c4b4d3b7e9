"""Where text comes from.

Datasets are named ``wikitext2`` or ``c4`` (optionally with a split: ``wikitext2:validation``), or are
a path to a local ``.txt``, ``.jsonl``/``.json`` (a ``text`` field per record) or ``.parquet`` (a
``text`` column) file.

Lookup order: a local mirror directory in the Hub's layout when ``data_dir`` (``--data-dir``) or the
``LLMPRUNE_DATA_DIR`` environment variable names one, else the Hugging Face Hub. The mirror layout
(as in ``shared/data``)::

    wikitext-2-raw-v1/{train,validation,test}-00000-of-00001.parquet
    c4/c4-validation-1k.parquet   (or c4/en/c4-{train,validation}.*.json.gz as on the Hub)

C4 in a mirror that only has the 1000-document validation sample: calibration reads documents
0-499 and evaluation documents 500-999, so the two never overlap; the report says so.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import LLMPruneError, did_you_mean

WIKITEXT_REPO = "Salesforce/wikitext"
C4_REPO = "allenai/c4"
_WT_FILE = "wikitext-2-raw-v1/{split}-00000-of-00001.parquet"
_C4_HUB = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
_C4_LOCAL_1K = "c4/c4-validation-1k.parquet"
_C4_HALF = 500
NAMED = ("wikitext2", "c4")


@dataclass(frozen=True)
class TextSource:
    """Resolved text: documents plus a description of exactly where they came from."""

    name: str  # wikitext2 | c4 | file
    split: str
    path: str  # file read (local path or Hub repo/file)
    docs: slice | None  # document range used, None = all
    origin: str  # "local" | "hub"

    @property
    def key(self) -> str:
        """Identity used to refuse calibrating on the data that is evaluated."""
        rng = "" if self.docs is None else f"[{self.docs.start}:{self.docs.stop}]"
        return f"{self.path}{rng}"

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"dataset": self.name, "split": self.split, "file": self.path, "origin": self.origin}
        if self.docs is not None:
            out["documents"] = [self.docs.start, self.docs.stop]
        return out


def resolve_data_dir(data_dir: str | None) -> Path | None:
    chosen = data_dir or os.environ.get("LLMPRUNE_DATA_DIR") or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        origin = "--data-dir" if data_dir else "LLMPRUNE_DATA_DIR"
        raise LLMPruneError(f"data directory {chosen} (from {origin}) does not exist; point it at a local mirror such as ../shared/data")
    # absolute: the files a run records are then named relative to the mirror (io.public), whatever
    # the working directory, instead of leaking a relative local path such as ../shared/data/...
    return Path(os.path.normpath(path.absolute()))


def split_name(dataset: str) -> tuple[str, str | None]:
    if dataset in NAMED or ":" not in dataset or Path(dataset).exists():
        return dataset, None
    base, split = dataset.rsplit(":", 1)
    return base, split


def resolve(dataset: str, purpose: str, data_dir: str | None) -> TextSource:
    """Resolve a dataset name for ``purpose`` ("calibration" or "evaluation") without reading it."""
    base, split = split_name(dataset)
    root = resolve_data_dir(data_dir)
    if base == "wikitext2":
        split = split or ("train" if purpose == "calibration" else "test")
        if split not in ("train", "validation", "test"):
            raise LLMPruneError(f"wikitext2 has splits train, validation, test; got {split!r}")
        if root is None:
            return TextSource("wikitext2", split, f"{WIKITEXT_REPO}/{_WT_FILE.format(split=split)}", None, "hub")
        path = root / _WT_FILE.format(split=split)
        if not path.is_file() and split == "train" and purpose == "calibration":
            # The mirror on our machines has no train split; its README says to use validation.
            fallback = root / _WT_FILE.format(split="validation")
            if fallback.is_file():
                return TextSource("wikitext2", "validation", str(fallback), None, "local")
        if not path.is_file():
            raise LLMPruneError(f"wikitext2 {split} split not found in {root} (expected {path})")
        return TextSource("wikitext2", split, str(path), None, "local")
    if base == "c4":
        split = split or ("train" if purpose == "calibration" else "validation")
        if split not in ("train", "validation"):
            raise LLMPruneError(f"c4 has splits train and validation; got {split!r}")
        if root is None:
            docs = None if purpose == "calibration" else slice(0, 1100)  # papers: first 1100 validation docs
            return TextSource("c4", split, f"{C4_REPO}/{_C4_HUB[split]}", docs, "hub")
        hub_layout = root / "c4" / _C4_HUB[split]
        if hub_layout.is_file():
            docs = None if purpose == "calibration" else slice(0, 1100)
            return TextSource("c4", split, str(hub_layout), docs, "local")
        small = root / _C4_LOCAL_1K
        if not small.is_file():
            raise LLMPruneError(f"c4 not found in {root} (expected {small} or {hub_layout})")
        docs = slice(0, _C4_HALF) if purpose == "calibration" else slice(_C4_HALF, 2 * _C4_HALF)
        return TextSource("c4", "validation", str(small), docs, "local")
    path = Path(dataset).expanduser()
    if not path.is_file():
        raise LLMPruneError(
            f"dataset {dataset!r}{did_you_mean(base, NAMED)} is neither wikitext2 nor c4 nor an existing "
            f".txt/.jsonl/.json/.parquet file"
        )
    if path.suffix not in (".txt", ".jsonl", ".json", ".parquet"):
        raise LLMPruneError(f"unsupported file type {path.suffix!r} for {dataset}; use .txt, .jsonl, .json or .parquet")
    return TextSource("file", "all", str(path.resolve()), None, "local")


_OFFLINE_HINT = ("point --data-dir (or LLMPRUNE_DATA_DIR) at a local mirror of the datasets, "
                 "e.g. --data-dir ../shared/data")


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached (``HF_HUB_OFFLINE``, no name resolution, no connection), or None.

    Asked once per process, with a short timeout: without it, huggingface_hub retries for about
    30 s and prints every retry before our message."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as exc:
        return f"{host} is unreachable ({exc.strerror or type(exc).__name__})"
    return None


def require_hub(sources: list[TextSource]) -> None:
    """Fail at once, before any work, when a source needs the Hub and the Hub is unreachable."""
    remote = [s for s in sources if s.origin == "hub"]
    reason = hub_unreachable() if remote else None
    if reason:
        names = ", ".join(sorted({s.name for s in remote}))
        raise LLMPruneError(f"{names} would be downloaded from the Hugging Face Hub, but {reason}; {_OFFLINE_HINT}")


def _hub_file(path: str) -> str:
    from huggingface_hub import hf_hub_download

    reason = hub_unreachable()
    if reason:
        raise LLMPruneError(f"cannot download {path} from the Hugging Face Hub: {reason}; {_OFFLINE_HINT}")

    repo, _, filename = path.partition("/")
    repo_id = repo + "/" + filename.split("/", 1)[0]
    inner = filename.split("/", 1)[1]
    try:
        return str(hf_hub_download(repo_id=repo_id, filename=inner, repo_type="dataset"))
    except Exception as exc:  # network errors come in many types
        raise LLMPruneError(
            f"could not download {inner} from the Hub dataset {repo_id} ({type(exc).__name__}); "
            f"without network access, point --data-dir or LLMPRUNE_DATA_DIR at a local mirror"
        ) from exc


def read_documents(source: TextSource) -> list[str]:
    """The documents (rows) of a source, in order."""
    path = _hub_file(source.path) if source.origin == "hub" else source.path
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["text"])
        docs = [t if t is not None else "" for t in table.column("text").to_pylist()]
    elif path.endswith((".json.gz", ".jsonl", ".json")):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
            text = fh.read()
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            records = json.loads(text)
        if isinstance(records, dict) or not all(isinstance(r, dict) and "text" in r for r in records):
            raise LLMPruneError(f"{path}: expected JSON lines (or a JSON list) of records with a 'text' field")
        docs = [str(r["text"]) for r in records]
    else:
        docs = [Path(path).read_text(encoding="utf-8")]
    if source.docs is not None:
        docs = docs[source.docs]
    return docs
