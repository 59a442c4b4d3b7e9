"""Write a model (an llmprune run folder, a Hugging Face folder, a ``.gguf`` file or a built-in name)
as a GGUF file that llama.cpp runs, with the tokenizer embedded and per-layer widths kept.

What is exported is exactly what ``llmprune.load`` loads (the same loader, the same checks), in float32,
renamed with the ``gguf`` package's tensor-name map and transformed the way llama.cpp's own
``convert_hf_to_gguf.py`` transforms each family (LLaMA's q/k rows permuted for its rotary layout,
Gemma's norms stored as ``1 + w``). Quantized types go through llama.cpp's own quantizer
(``llama_model_quantize`` from llama-cpp-python) on a float32 file written first.

Per-layer widths. llama.cpp (as bundled in llama-cpp-python 0.3.36) reads
``{arch}.feed_forward_length`` / ``attention.head_count(_kv)`` as per-layer arrays for every
architecture, but most architectures build their tensors with layer 0's values. Its ``deci``
architecture (Llama-3.1-Nemotron) is a LLaMA that sizes every layer on its own, so a LLaMA/Mistral
model with uneven MLP widths or KV heads is written as ``deci`` and runs at its pruned size. Other
families are written at the widest layer's width, the missing channels and heads zero-filled:
exact (a zero channel adds nothing, a zero KV head's values are zero) but no faster than the widest
layer; ``ExportResult.padded`` says so, and a run pruned with ``--set method.uniform=true`` avoids it.

Every check a user can fail (folder, family, type, output path, report vs tensors, sparse model vs a
type that fills in zeros) runs before any weight is read; the file is written to a temporary name
beside the output and moved into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LLMPruneError

log = logging.getLogger(__name__)

# --type values: the float types the writer produces itself, then llama.cpp's quantizer ftypes
# (llama_cpp.LLAMA_FTYPE_MOSTLY_<NAME>).
FLOAT_TYPES = ("f32", "f16", "bf16")
QUANT_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
               "q5_k_s", "q5_k_m", "q6_k")
GGUF_TYPES = FLOAT_TYPES + QUANT_TYPES
# Types whose blocks are symmetric (value = scale * integer), so an exact zero stays exactly zero; the
# others store a per-block minimum and turn a pruned weight into a small non-zero value
# (tests/test_export.py measures both groups by dequantizing llama.cpp's output).
KEEPS_ZEROS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q6_k")
SPARSE_THRESHOLD = 0.1  # fraction of exact zeros in the decoder's linear weights that makes a model "sparse"


@dataclass(frozen=True)
class _Family:
    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # LLaMA rotary layout: HF q/k rows are permuted (convert_hf_to_gguf's LlamaModel)
    norm_shift: float = 0.0  # Gemma stores RMSNorm weights as w, runs 1 + w; llama.cpp wants 1 + w
    per_layer_arch: str | None = None  # an architecture that sizes every layer on its own
    down_bias: bool = False  # whether llama.cpp's graph adds an ffn_down bias (FLAP adds one)


# HF model_type -> how llama.cpp runs it (read from llama.cpp's src/models/<arch>.cpp).
FAMILIES: dict[str, _Family] = {
    "llama": _Family("LLAMA", permute_qk=True, per_layer_arch="DECI", down_bias=True),
    "mistral": _Family("LLAMA", permute_qk=True, per_layer_arch="DECI", down_bias=True),
    "qwen2": _Family("QWEN2"),
    "qwen3": _Family("QWEN3"),
    "gemma2": _Family("GEMMA2", norm_shift=1.0),
    "gemma3_text": _Family("GEMMA3", norm_shift=1.0),
    "phi3": _Family("PHI3"),
}
REFUSED = {"opt": "llama.cpp has no OPT architecture (its loader knows no OPT graph), so no GGUF of it can run"}


@dataclass
class ExportResult:
    """What was written, and how llama.cpp will see it."""

    path: str
    type: str
    arch: str
    family: str
    mlp_widths: list[int]
    kv_heads: list[int]
    q_heads: list[int]
    padded: bool  # widths written at the widest layer's size (zero-filled), not at their own
    size_bytes: int
    tokenizer: str  # where the embedded tokenizer came from
    sparse_fraction: float  # exact zeros in the decoder's linear weights of the model exported
    zeros_filled: float | None = None  # fraction of those zeros the quantizer turned non-zero (measured)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ checks before any work

def _check_output(output: str | os.PathLike[str], overwrite: bool) -> Path:
    path = Path(output).expanduser()
    if path.suffix != ".gguf":
        raise LLMPruneError(f"output {path} must end with .gguf")
    for parent in path.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise LLMPruneError(f"output {path} lies under {parent}, which is a file, not a folder")
    if path.is_dir():
        raise LLMPruneError(f"output {path} is a folder; name the .gguf file to write")
    if path.exists() and not overwrite:
        raise LLMPruneError(f"output {path} already exists; choose another --output or pass --overwrite")
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.absolute().parent, os.W_OK):
        raise LLMPruneError(f"cannot write into {path.absolute().parent}")
    return path


def _check_type(qtype: str) -> str:
    qtype = qtype.lower()
    if qtype not in GGUF_TYPES:
        raise LLMPruneError(f"unknown --type {qtype!r}; use one of {', '.join(GGUF_TYPES)}")
    if qtype in QUANT_TYPES and _llama_cpp() is None:
        raise LLMPruneError(f"--type {qtype} quantizes with llama.cpp's quantizer, which needs llama-cpp-python: "
                            f"pip install 'llmprune[deploy]' (or export --type f16/f32/bf16)")
    return qtype


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def _safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors headers (no weights read)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())) if index.is_file()
             else ["model.safetensors"] if (folder / "model.safetensors").is_file() else [])
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        try:
            with safe_open(str(folder / name), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    shapes[key] = tuple(fh.get_slice(key).get_shape())
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise LLMPruneError(f"{folder / name} cannot be read ({exc}); the checkpoint is corrupt") from None
    return shapes


def _layer_widths(shapes: dict[str, tuple[int, ...]]) -> dict[int, int]:
    widths = {}
    for key, shape in shapes.items():
        m = re.search(r"layers\.(\d+)\.mlp\.(down_proj|fc2)\.weight$", key)
        if m and len(shape) == 2:
            widths[int(m.group(1))] = shape[1]
    return widths


def _check_report(folder: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """A run folder's ``llmprune.json`` must describe the tensors beside it."""
    from ..io.save import REPORT_NAME

    report_path = folder / REPORT_NAME
    if not report_path.is_file():
        return None
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise LLMPruneError(f"{report_path} is not valid JSON ({exc}); the run folder is damaged") from None
    widths = _layer_widths(_safetensors_shapes(folder))
    stored = [widths[i] for i in sorted(widths)]
    structure = report.get("structure") or {}
    for recorded in ((structure.get("mlp_channels") or {}).get("widths"),
                     (structure.get("checkpoint") or {}).get("mlp_widths")):
        if isinstance(recorded, list) and stored and recorded != stored:
            raise LLMPruneError(f"{report_path} records MLP widths {recorded} but the checkpoint's tensors have "
                                f"{stored}; the report and the weights come from different runs (re-run the pruning "
                                f"or fix the folder)")
    n_layers = config.get("num_hidden_layers")
    if stored and n_layers is not None and len(stored) != n_layers:
        raise LLMPruneError(f"{folder}: config.json says {n_layers} layers, the checkpoint has {len(stored)}")
    return report


def _resolve(model: str) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    from ..models.loading import gguf_to_folder, resolve_source

    source = resolve_source(str(model))
    if source.kind == "hub":
        raise LLMPruneError(f"export reads local models only; {model!r} is not a local folder, .gguf file or built-in "
                            f"name (download it first, or prune it and export the run folder)")
    folder = Path(source.location) if source.kind == "folder" else None
    if folder is None:  # the GGUF's family is known only once transformers converted it (cached)
        folder = gguf_to_folder(source.location)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    family = config.get("model_type")
    if family in REFUSED:
        raise LLMPruneError(f"cannot export {model}: {REFUSED[family]}")
    if family not in FAMILIES:
        raise LLMPruneError(f"cannot export {model}: model family {family!r} is not one the GGUF exporter supports "
                            f"({', '.join(sorted(FAMILIES))})")
    report = _check_report(folder, config) if source.kind == "folder" else None
    return source, config, report


def _reported_sparsity(report: dict[str, Any] | None) -> float | None:
    if not report or report.get("structure"):
        return None
    sp = report.get("sparsity")
    value = sp.get("overall") if isinstance(sp, dict) else sp
    if isinstance(value, dict):
        value = value.get("sparsity")
    return float(value) if isinstance(value, (int, float)) else None


def _refuse_fill(qtype: str, sparsity: float, allow_fill: bool) -> None:
    if qtype in KEEPS_ZEROS or allow_fill or sparsity < SPARSE_THRESHOLD:
        return
    raise LLMPruneError(
        f"the model is sparse ({sparsity:.0%} of its linear weights are exact zeros) and --type {qtype} stores a "
        f"per-block minimum, which turns pruned weights into small non-zero values (the zeros are lost, and "
        f"llama.cpp does not compute sparse weights faster either way); use one of "
        f"{', '.join(t for t in KEEPS_ZEROS if t not in FLOAT_TYPES)} (they keep exact zeros), a float type, or pass "
        f"--allow-fill to quantize anyway (the fraction of zeros filled in is measured and reported)")


# ------------------------------------------------------------------ tensors

def _structure(state: dict[str, Any], config: Any, n_layers: int) -> tuple[list[int], list[int], list[int], int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    widths, kv, q = [], [], []
    for i in range(n_layers):
        p = f"model.layers.{i}."
        widths.append(int(state[p + "mlp.down_proj.weight"].shape[1]))
        if p + "self_attn.k_proj.weight" in state:
            kv.append(int(state[p + "self_attn.k_proj.weight"].shape[0]) // head_dim)
            q.append(int(state[p + "self_attn.q_proj.weight"].shape[0]) // head_dim)
        else:  # fused qkv (Phi-3): llmprune never prunes its heads
            kv.append(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
            q.append(int(config.num_attention_heads))
    return widths, kv, q, head_dim


def _permute(w: np.ndarray, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: HF's rotate-half rows to llama.cpp's interleaved pairs."""
    n = w.shape[0] // head_dim
    return w.reshape(n, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pad_rows(w: np.ndarray, rows: int) -> np.ndarray:
    if w.shape[0] == rows:
        return w
    return np.concatenate([w, np.zeros((rows - w.shape[0], *w.shape[1:]), dtype=w.dtype)], axis=0)


def _pad_cols(w: np.ndarray, cols: int) -> np.ndarray:
    if w.shape[1] == cols:
        return w
    return np.concatenate([w, np.zeros((w.shape[0], cols - w.shape[1]), dtype=w.dtype)], axis=1)


def _pad_layer(name: str, w: np.ndarray, width: int, max_width: int, kv: int, max_kv: int, q: int, max_q: int,
               head_dim: int) -> np.ndarray:
    """Zero-fill a layer's tensor to the widest layer's shape (channels and heads appended at the end;
    llama.cpp's query head h reads KV head h // (n_head / n_head_kv), which appending whole groups keeps)."""
    if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias")):
        return _pad_rows(w, max_width)
    if name.endswith("mlp.gate_up_proj.weight"):
        return np.concatenate([_pad_rows(w[:width], max_width), _pad_rows(w[width:], max_width)], axis=0)
    if name.endswith("mlp.down_proj.weight"):
        return _pad_cols(w, max_width)
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return _pad_rows(w, max_q * head_dim)
    if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
                      "self_attn.v_proj.bias")):
        return _pad_rows(w, max_kv * head_dim)
    if name.endswith("self_attn.o_proj.weight"):
        return _pad_cols(w, max_q * head_dim)
    return w


def _tensors(model: Any, spec: _Family, arch: Any, pad: bool, widths: list[int], kv: list[int], q: list[int],
             head_dim: int) -> list[tuple[str, np.ndarray]]:
    import gguf

    names = gguf.get_tensor_name_map(arch, len(widths))
    state = model.state_dict()
    tied = ("lm_head.weight" in state and "model.embed_tokens.weight" in state
            and state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr())
    out = []
    for name, t in state.items():
        if name == "lm_head.weight" and (tied or spec.arch.startswith("GEMMA")):
            continue  # llama.cpp reuses token_embd when the output matrix is absent
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise LLMPruneError(f"tensor {name} has no GGUF name for llama.cpp's {arch.name.lower()} architecture; "
                                f"this model cannot be exported")
        w = t.detach().float().cpu().numpy()
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and pad:
            i = int(m.group(1))
            w = _pad_layer(name, w, widths[i], max(widths), kv[i], max(kv), q[i], max(q), head_dim)
        if spec.permute_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                              "self_attn.q_proj.bias", "self_attn.k_proj.bias")):
            w = _permute(w, head_dim)
        if spec.norm_shift and name.endswith("norm.weight"):
            w = w + spec.norm_shift
        out.append((gname, np.ascontiguousarray(w, dtype=np.float32)))
    return out


# ------------------------------------------------------------------ tokenizer

def _gguf_source(source: Any, report: dict[str, Any] | None) -> Path | None:
    """The GGUF file a model came from (itself, or the model named in its run report)."""
    from ..models.loading import resolve_source

    if source.kind in ("builtin", "gguf"):
        return Path(source.location)
    name = (report or {}).get("model")
    if isinstance(name, str):
        with contextlib.suppress(LLMPruneError):
            origin = resolve_source(name)
            if origin.kind in ("builtin", "gguf"):
                return Path(origin.location)
    return None


def _copy_gguf_tokenizer(writer: Any, path: Path, n_vocab: int) -> bool:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != n_vocab:
        return False
    for key, f in fields.items():
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, list(f.contents()))
        else:
            writer.add_key_value(key, f.contents(), vtype)
    return True


def _hf_tokenizer(writer: Any, folder: Path, n_vocab: int) -> str:
    """tokenizer.json / tokenizer.model through the gguf package's vocab readers (as convert_hf_to_gguf)."""
    import gguf

    vocab: Any = None
    kind = "none"
    tj = folder / "tokenizer.json"
    model_json = json.loads(tj.read_text(encoding="utf-8")).get("model", {}) if tj.is_file() else {}
    if (folder / "tokenizer.model").is_file():
        with contextlib.suppress(ImportError, FileNotFoundError):
            vocab, kind = gguf.vocab.SentencePieceVocab(folder), "llama"
    if vocab is None and model_json.get("type") == "BPE" and model_json.get("byte_fallback"):
        vocab, kind = gguf.vocab.LlamaHfVocab(folder), "llama"
    elif vocab is None and tj.is_file():
        with contextlib.suppress(FileNotFoundError):
            vocab, kind = gguf.vocab.BpeVocab(folder), "gpt2"
    if vocab is None:
        writer.add_tokenizer_model("none")
        writer.add_vocab_size(n_vocab)
        return "none (no tokenizer.json or tokenizer.model: feed token ids)"
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    if len(tokens) > n_vocab:  # added tokens without an embedding row (a pad token added after training)
        log.warning("%s: the tokenizer has %d tokens, the embedding %d rows; tokens %s have no row and are left out",
                    folder, len(tokens), n_vocab, [t.decode(errors="replace") for t in tokens[n_vocab:]][:5])
        del tokens[n_vocab:], scores[n_vocab:], types[n_vocab:]
    for i in range(len(tokens), n_vocab):  # embeddings padded past the vocabulary (as convert_hf_to_gguf)
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    if kind == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.vocab.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=n_vocab)
    if kind == "gpt2" and not special.merges:
        special.merges = [" ".join(["\u0120", "\u0120"])]  # llama.cpp requires a merges list; one unused merge
    special.add_to_gguf(writer, quiet=True)
    return f"{kind} tokenizer from {tj.name if tj.is_file() else 'tokenizer.model'}"


# ------------------------------------------------------------------ metadata

def _rope(config: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        return params["full_attention"], params.get("sliding_attention")
    if not params and getattr(config, "rope_theta", None) is not None:
        params = {"rope_type": "default", "rope_theta": config.rope_theta}
    return params, None


def _write_hparams(w: Any, config: Any, spec: _Family, arch_is_deci: bool, widths: list[int], kv: list[int],
                   q: list[int], head_dim: int, pad: bool) -> None:
    import gguf

    n_layers = len(widths)
    w.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(n_layers)
    if pad:
        w.add_feed_forward_length(max(widths))
        w.add_head_count(max(q))
        w.add_head_count_kv(max(kv))
    else:
        w.add_feed_forward_length(widths if len(set(widths)) > 1 else widths[0])
        w.add_head_count(q if len(set(q)) > 1 else q[0])
        w.add_head_count_kv(kv if len(set(kv)) > 1 else kv[0])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    rope, rope_swa = _rope(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "linear"):
        raise LLMPruneError(f"rope scaling {rope_type!r} is not supported by the GGUF exporter (default and linear are)")
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope_swa is not None and "rope_theta" in rope_swa:
        w.add_rope_freq_base_swa(float(rope_swa["rope_theta"]))
    rot = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0)
    w.add_rope_dimension_count(int(head_dim * rot))
    w.add_vocab_size(int(config.vocab_size))
    if spec.arch in ("GEMMA2", "GEMMA3"):
        if getattr(config, "query_pre_attn_scalar", head_dim) != head_dim:
            raise LLMPruneError(f"query_pre_attn_scalar={config.query_pre_attn_scalar} differs from head_dim={head_dim}: "
                                f"llama.cpp scales Gemma queries by 1/sqrt(head_dim), so the export would not match")
        if getattr(config, "attn_logit_softcapping", None):
            w.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if getattr(config, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(float(config.final_logit_softcapping))
        types = getattr(config, "layer_types", None)
        if getattr(config, "sliding_window", None) and types:
            w.add_sliding_window(int(config.sliding_window))
            w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    if spec.arch == "PHI3":
        w.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings",
                                                     getattr(config, "original_max_position_embeddings", 4096))))
        if getattr(config, "sliding_window", None):
            w.add_sliding_window(int(config.sliding_window))


def _sliding_notes(config: Any, spec: _Family) -> list[str]:
    window = getattr(config, "sliding_window", None)
    uses = getattr(config, "use_sliding_window", True)
    if spec.arch in ("LLAMA", "QWEN2") and window and uses:
        return [f"the model attends within a sliding window of {window} tokens; llama.cpp's {spec.arch.lower()} "
                f"attends to the whole context, so outputs agree up to {window} tokens"]
    return []


# ------------------------------------------------------------------ export

def export(model: str | os.PathLike[str], output: str | os.PathLike[str], *, format: str = "gguf",  # noqa: A002
           type: str = "f16", overwrite: bool = False, allow_fill: bool = False) -> ExportResult:  # noqa: A002
    """Export ``model`` (run folder, HF folder, ``.gguf`` file or built-in name) to ``output``.

    ``type`` is f32, f16, bf16 or a llama.cpp quantization (q8_0, q4_k_m, ...). A sparse model is
    refused for a type that fills in its zeros unless ``allow_fill``. Returns what was written."""
    if format != "gguf":
        raise LLMPruneError(f"unknown export format {format!r}; the only format is gguf")
    qtype = _check_type(type)
    path = _check_output(output, overwrite)
    source, config_json, report = _resolve(str(model))
    spec = FAMILIES[config_json["model_type"]]
    reported = _reported_sparsity(report)
    if reported is not None:
        _refuse_fill(qtype, reported, allow_fill)
    if spec.down_bias is False and (config_json.get("llmprune_structure") or {}).get("mlp_out_bias"):
        raise LLMPruneError(
            f"{model} has a bias on the MLP output (added by FLAP to keep pruned channels' mean), and llama.cpp's "
            f"{spec.arch.lower()} architecture has no ffn_down bias, so the export would not compute the same "
            f"model; prune it with a method that adds no bias (cfsp, or flap with --set method.bias=false if "
            f"you accept the loss), or export a LLaMA/Mistral model, whose llama.cpp graph reads the bias")

    from ..models.loading import load_model

    model_obj, _ = load_model(str(model), dtype="float32", device="cpu")
    return _write(model_obj, source, report, spec, config_json["model_type"], qtype, path, allow_fill)


def _sparsity(tensors: list[tuple[str, np.ndarray]]) -> float:
    zeros = total = 0
    for name, w in tensors:
        if name.startswith("blk.") and w.ndim == 2:
            zeros += int(np.count_nonzero(w == 0))
            total += w.size
    return zeros / total if total else 0.0


def _write(model: Any, source: Any, report: dict[str, Any] | None, spec: _Family, family: str, qtype: str,
           path: Path, allow_fill: bool) -> ExportResult:
    import gguf

    config = model.config
    n_layers = int(config.num_hidden_layers)
    state = model.state_dict()
    widths, kv, q, head_dim = _structure(state, config, n_layers)
    uneven = len(set(widths)) > 1 or len(set(kv)) > 1 or len(set(q)) > 1
    arch_name = spec.per_layer_arch if uneven and spec.per_layer_arch else spec.arch
    pad = uneven and spec.per_layer_arch is None
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    notes = _sliding_notes(config, spec)
    if pad:
        notes.append(f"llama.cpp's {spec.arch.lower()} architecture sizes every layer like layer 0, so the uneven "
                     f"widths are written zero-filled to the widest layer ({max(widths)} MLP channels, {max(kv)} KV "
                     f"heads): exact, but as slow as that width; prune with --set method.uniform=true to run faster")
    if arch_name == "DECI":
        notes.append("uneven widths written as llama.cpp's 'deci' architecture (a LLaMA with per-layer sizes)")
    odd = sorted({x for x in widths if x % 256})
    if qtype in QUANT_TYPES and qtype not in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1") and odd:
        notes.append(f"MLP widths {odd[:4]}{'...' if len(odd) > 4 else ''} are not multiples of 256, the block of "
                     f"llama.cpp's k-quants: those ffn_down tensors fall back to q5_0/q8_0 (multiples of 32) or f16; "
                     f"prune with --set method.round_to=256 for a smaller, faster {qtype} file")
    elif qtype in QUANT_TYPES and any(x % 32 for x in widths):
        notes.append(f"some MLP widths are not multiples of 32, the block of {qtype}: those ffn_down tensors fall back "
                     f"to f16; prune with --set method.round_to=32")
    tensors = _tensors(model, spec, arch, pad, widths, kv, q, head_dim)
    sparse = _sparsity(tensors)
    _refuse_fill(qtype, sparse, allow_fill)
    n_vocab = int(state["model.embed_tokens.weight"].shape[0])

    tmp_dir = Path(tempfile.mkdtemp(dir=path.absolute().parent, prefix=f".{path.name}.tmp-"))
    try:
        float_path = tmp_dir / "model.gguf"
        w = gguf.GGUFWriter(str(float_path), gguf.MODEL_ARCH_NAMES[arch])
        ftype = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16}.get(
            qtype, gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.ALL_F32)
        w.add_file_type(ftype)
        _write_hparams(w, config, spec, arch_name == "DECI", widths, kv, q, head_dim, pad)
        origin = _gguf_source(source, report)
        if origin is not None and _copy_gguf_tokenizer(w, origin, n_vocab):
            tok_desc = f"copied from {origin.name}"
        else:
            tok_desc = _hf_tokenizer(w, _folder_of(source), n_vocab)
        w.add_name(_model_name(w, str(getattr(config, "_name_or_path", "") or family).split("/")[-1] or family))
        _provenance(w, report, widths, kv, pad)
        for gname, arr in tensors:
            if qtype in ("f16", "bf16") and arr.ndim == 2:
                gtype = gguf.GGMLQuantizationType.F16 if qtype == "f16" else gguf.GGMLQuantizationType.BF16
                w.add_tensor(gname, gguf.quants.quantize(arr, gtype), raw_dtype=gtype)
            else:  # 1-D tensors (norms, biases) stay float32, as llama.cpp's converter keeps them
                w.add_tensor(gname, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        del tensors
        final = float_path
        filled = None
        if qtype in QUANT_TYPES:
            final = tmp_dir / "quantized.gguf"
            _quantize(float_path, final, qtype)
            if sparse >= SPARSE_THRESHOLD:
                filled = zeros_filled(float_path, final)
                notes.append(f"{qtype} turned {filled:.1%} of the pruned (zero) weights non-zero")
        os.replace(final, path)
    finally:
        for f in tmp_dir.glob("*"):
            f.unlink(missing_ok=True)
        tmp_dir.rmdir()
    for note in notes:
        log.warning("%s", note)
    return ExportResult(path=str(path), type=qtype, arch=gguf.MODEL_ARCH_NAMES[arch], family=family,
                        mlp_widths=widths, kv_heads=kv, q_heads=q, padded=pad, size_bytes=path.stat().st_size,
                        tokenizer=tok_desc, sparse_fraction=round(sparse, 6), zeros_filled=filled, notes=notes)


def _model_name(w: Any, name: str) -> str:
    """``general.name``, minus a "phi3" llama.cpp would act on: its vocabulary loader looks up Phi-3's
    special tokens (``</s>``, ``<s>``, ``<unk>``, ``<|endoftext|>``) in any model whose name says phi3,
    and fails to load one whose vocabulary lacks them."""
    field = w.kv_data[0].get("tokenizer.ggml.tokens")
    tokens = {t.decode() if isinstance(t, bytes) else t for t in (field.value if field is not None else [])}
    if re.search(r"phi-?3", name.lower()) and not {"</s>", "<s>", "<unk>", "<|endoftext|>"} <= tokens:
        return re.sub(r"(?i)phi(-?)3", r"phi\g<1>_3", name)
    return name


def _folder_of(source: Any) -> Path:
    from ..models.loading import gguf_to_folder

    return Path(source.location) if source.kind == "folder" else gguf_to_folder(source.location)


def _provenance(w: Any, report: dict[str, Any] | None, widths: list[int], kv: list[int], pad: bool) -> None:
    from .. import __version__

    w.add_string("llmprune.version", __version__)
    w.add_bool("llmprune.padded", pad)
    if report:
        w.add_string("llmprune.method", str(report.get("method")))
        w.add_string("llmprune.recipe", json.dumps(report.get("recipe"), default=str, sort_keys=True))
        w.add_string("llmprune.source_model", str(report.get("model")))


def _quantize(src: Path, dst: Path, qtype: str) -> None:
    import ctypes

    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = min(os.cpu_count() or 1, 8)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise LLMPruneError(f"llama.cpp's quantizer failed ({rc}) quantizing to {qtype}")


def zeros_filled(float_file: str | os.PathLike[str], quant_file: str | os.PathLike[str]) -> float:
    """The fraction of the exact zeros of the float file's layer weights that the quantized file
    stores as non-zero (dequantized with the gguf package)."""
    import gguf

    src = {t.name: t for t in gguf.GGUFReader(str(float_file)).tensors}
    zeros = filled = 0
    for t in gguf.GGUFReader(str(quant_file)).tensors:
        s = src.get(t.name)
        if s is None or not t.name.startswith("blk.") or len(t.shape) != 2:
            continue
        a = gguf.quants.dequantize(s.data, s.tensor_type)
        b = gguf.quants.dequantize(t.data, t.tensor_type)
        mask = a == 0
        zeros += int(mask.sum())
        filled += int(np.count_nonzero(b[mask]))
    return filled / zeros if zeros else 0.0
