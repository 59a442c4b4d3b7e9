"""GGUF export: every exported file is loaded and run in llama.cpp (llama-cpp-python) and compared
with PyTorch: next-token log-probabilities at every position of a prompt, the greedy continuation,
and the per-layer widths llama.cpp reads back."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import llmprune
from llmprune import LLMPruneError
from llmprune.deploy import KEEPS_ZEROS, export
from tests.conftest import save_tiny

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python not installed "
                                     "(pip install 'llmprune[deploy]'; make setup installs it)")
EXPORTABLE = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
KV_PRUNABLE = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]  # Phi-3's fused qkv keeps its heads
# Tiny-model overrides: a window llama.cpp's llama/qwen2 graphs do not apply is made longer than the
# sequences compared (llama.cpp attends to the whole context there; the exporter warns); Gemma keeps
# its 8-token window, which llama.cpp applies, and the prompt is longer than it.
OVERRIDES = {"mistral": {"sliding_window": 4096}, "qwen2": {"use_sliding_window": False},
             "gemma2": {"query_pre_attn_scalar": 16}, "gemma3": {"query_pre_attn_scalar": 16}}
# Max |log-prob difference| over the vocabulary and every position: f32 (weights and KV cache) is the
# same arithmetic up to summation order; f16 rounds every weight and llama.cpp's default f16 KV cache
# (tiny random models have unit-scale logits).
TOL = {"f32": 1e-3, "f16": 3e-2}
PROMPT = [5, 17, 33, 2, 250, 101, 66, 9, 120, 42, 7, 88]


def _torch_logprobs(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1).numpy()


def _torch_greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def _llama(path: Path, n_ctx: int = 64, verbose: bool = False, f32_cache: bool = False):  # type: ignore[no-untyped-def]
    """llama.cpp on 2 threads; ``f32_cache`` keeps the KV cache in float32 (its default is f16)."""
    from llama_cpp import GGML_TYPE_F32, Llama

    cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, logits_all=True, verbose=verbose,
                 seed=0, **cache)


def _lcpp_logprobs(llm, ids: list[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    llm.reset()
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
    return scores - np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1, keepdims=True)) - scores.max(
        -1, keepdims=True)


def _lcpp_greedy(llm, ids: list[int], n: int) -> list[int]:  # type: ignore[no-untyped-def]
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def _check_runs_like_torch(path: Path, model: torch.nn.Module, qtype: str, ids: list[int] = PROMPT) -> float:
    llm = _llama(path, f32_cache=qtype == "f32")
    ref = _torch_logprobs(model, ids)
    got = _lcpp_logprobs(llm, ids)
    diff = float(np.abs(got - ref).max())
    assert diff < TOL[qtype], f"{path.name}: log-probs differ by {diff} (tolerance {TOL[qtype]})"
    want = _torch_greedy(model, ids, 4)
    got_greedy = _lcpp_greedy(llm, ids, 4)
    # Near-ties may flip under f16 rounding; the first token must agree, the rest where the margin is clear.
    assert got_greedy[0] == want[0]
    if qtype == "f32":
        assert got_greedy == want
    llm.close()
    return diff


def _read_widths(path: Path) -> tuple[list[int], list[int], str]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def values(key: str) -> list[int]:
        f = reader.fields[f"{arch}.{key}"]
        return [int(f.parts[i][0]) for i in f.data]

    return values("feed_forward_length"), values("attention.head_count_kv"), arch


def _prune_run(tmp_path: Path, family: str, variant: str, calib_file: Path) -> Path:
    overrides = {**OVERRIDES.get(family, {}), **({"num_key_value_heads": 4} if variant == "cfsp_kv" else {})}
    dense = save_tiny(tmp_path / f"{family}-dense", family, **overrides)
    if variant == "dense":
        return dense
    opts = {"wanda50": dict(method="wanda", sparsity=0.5), "sparsegpt24": dict(method="sparsegpt", pattern="2:4"),
            "cfsp20": dict(method="cfsp", sparsity=0.2),
            "cfsp_kv": dict(method="cfsp", sparsity=0.2, method_options={"attention": 0.5})}[variant]
    out = tmp_path / f"{family}-{variant}"
    llmprune.prune(str(dense), calib_dataset=str(calib_file), nsamples=4, seqlen=32, output=str(out), **opts)
    return out


VARIANTS = ["dense", "wanda50", "sparsegpt24", "cfsp20", "cfsp_kv"]
# Every variant on LLaMA (uneven widths -> llama.cpp's per-layer 'deci') and Qwen3 (uneven widths ->
# zero-padded); every family dense and structured (per-layer MLP widths and, where heads can be
# removed, KV groups). Unstructured variants keep the dense shapes, so on the other families they
# take the dense path; they are left out there to keep the suite short.
CASES = ([(f, v) for f in ("llama", "qwen3") for v in VARIANTS]
         + [(f, v) for f in EXPORTABLE if f not in ("llama", "qwen3")
            for v in ("dense", "cfsp_kv" if f in KV_PRUNABLE else "cfsp20")])


@needs_llama_cpp
@pytest.mark.parametrize(("family", "variant"), CASES)
def test_tiny_export_runs_in_llama_cpp(family: str, variant: str, calib_file: Path, tmp_path: Path,
                                       capfd: pytest.CaptureFixture[str]) -> None:
    run = _prune_run(tmp_path, family, variant, calib_file)
    model = llmprune.load(run, dtype="float32")[0]
    qtype = "f16" if variant in ("cfsp20", "wanda50") else "f32"
    result = export(run, tmp_path / "out.gguf", type=qtype)
    ff, kv, arch = _read_widths(tmp_path / "out.gguf")
    layers = model.model.layers
    widths = [layer.mlp.down_proj.in_features for layer in layers]
    assert result.mlp_widths == widths
    uneven = len(set(widths)) > 1 or len(set(result.kv_heads)) > 1
    n = len(widths)
    ff_layers, kv_layers = (ff if len(ff) > 1 else ff * n), (kv if len(kv) > 1 else kv * n)
    if uneven and family in ("llama", "mistral"):  # per-layer sizes, run at their own size
        assert arch == "deci" and ff_layers == widths and kv_layers == result.kv_heads and not result.padded
    elif uneven:
        assert result.padded and ff == [max(widths)] and kv == [max(result.kv_heads)]
    else:
        assert ff == [widths[0]] and not result.padded
    if variant == "cfsp_kv":
        assert min(result.kv_heads) < 4
    _check_runs_like_torch(tmp_path / "out.gguf", model, qtype)
    # What llama.cpp itself read: its loader prints the per-layer n_ff it built the tensors with.
    llm = _llama(tmp_path / "out.gguf", verbose=True)
    llm.close()
    log = capfd.readouterr().err
    printed = re.search(r"n_ff\s*=\s*(\[[^\]]*\]|\d+)", log)
    assert printed is not None, "llama.cpp printed no n_ff"
    shown = json.loads(printed.group(1)) if printed.group(1).startswith("[") else [int(printed.group(1))]
    assert shown == (ff if len(ff) > 1 else [ff[0]]) or set(shown) == set(ff)


# ------------------------------------------------------------------ quantization and zeros

@needs_llama_cpp
def test_quantized_types_keep_or_fill_zeros_as_documented(calib_file: Path, tmp_path: Path) -> None:
    """Row size 256 so the k-quants apply: the types listed as keeping zeros keep every exact zero
    (measured by dequantizing llama.cpp's output); q4_k_m fills some in, and is refused without allow_fill."""
    dense = save_tiny(tmp_path / "dense", "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                      num_key_value_heads=2)
    run = tmp_path / "wanda"
    llmprune.prune(str(dense), method="wanda", sparsity=0.5, calib_dataset=str(calib_file), nsamples=4, seqlen=32,
                   output=str(run))
    with pytest.raises(LLMPruneError, match="allow-fill"):
        export(run, tmp_path / "refused.gguf", type="q4_k_m")
    assert not (tmp_path / "refused.gguf").exists()
    for qtype in ("q8_0", "q4_0"):
        assert qtype in KEEPS_ZEROS
        result = export(run, tmp_path / f"{qtype}.gguf", type=qtype)
        assert result.zeros_filled == 0.0, qtype
    result = export(run, tmp_path / "q4km.gguf", type="q4_k_m", allow_fill=True)
    assert result.zeros_filled is not None and result.zeros_filled > 0.1
    ref = _torch_logprobs(llmprune.load(run, dtype="float32")[0], PROMPT)
    diffs = {}
    for qtype in ("q8_0", "q4km"):  # both run; 8 bits stay close to the float model, 4 bits further off
        llm = _llama(tmp_path / f"{qtype}.gguf")
        diffs[qtype] = np.abs(_lcpp_logprobs(llm, PROMPT) - ref)
        llm.close()
    assert diffs["q8_0"].max() < 0.3 and diffs["q8_0"].mean() < 0.1 and diffs["q4km"].mean() < 0.5, {k: (v.max(), v.mean()) for k, v in diffs.items()}
    assert diffs["q8_0"].mean() < diffs["q4km"].mean()


# ------------------------------------------------------------------ refusals before any work

def test_bad_input_refused_before_any_work(tmp_path: Path, calib_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llmprune.models.loading as loading

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    folder = save_tiny(tmp_path / "llama", "llama")
    out = tmp_path / "out.gguf"
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(LLMPruneError, match="not a Hugging Face model folder"):
        export(tmp_path / "not-a-model", out)
    with pytest.raises(LLMPruneError, match="unknown --type"):
        export(folder, out, type="q3_bogus")
    with pytest.raises(LLMPruneError, match="format"):
        export(folder, out, format="onnx")
    out.write_text("mine")
    with pytest.raises(LLMPruneError, match="already exists"):
        export(folder, out)
    assert out.read_text() == "mine"
    with pytest.raises(LLMPruneError, match="which is a file"):
        export(folder, out / "x.gguf")
    opt = save_tiny(tmp_path / "opt", "opt")
    with pytest.raises(LLMPruneError, match="no OPT architecture"):
        export(opt, tmp_path / "opt.gguf")
    # A run folder whose report disagrees with its tensors.
    run = tmp_path / "cfsp"
    monkeypatch.undo()
    llmprune.prune(str(folder), method="cfsp", sparsity=0.25, calib_dataset=str(calib_file), nsamples=4, seqlen=32,
                   output=str(run))
    monkeypatch.setattr(loading, "load_model", no_load)
    report = json.loads((run / "llmprune.json").read_text())
    report["structure"]["mlp_channels"]["widths"] = [w + 8 for w in report["structure"]["mlp_channels"]["widths"]]
    (run / "llmprune.json").write_text(json.dumps(report))
    with pytest.raises(LLMPruneError, match="different runs"):
        export(run, tmp_path / "cfsp.gguf")
    # FLAP's MLP-output bias on an architecture whose llama.cpp graph has no ffn_down bias.
    monkeypatch.undo()
    qwen = save_tiny(tmp_path / "qwen2", "qwen2")
    flap = tmp_path / "flap"
    llmprune.prune(str(qwen), method="flap", sparsity=0.25, calib_dataset=str(calib_file), nsamples=4, seqlen=32,
                   output=str(flap))
    monkeypatch.setattr(loading, "load_model", no_load)
    with pytest.raises(LLMPruneError, match="no ffn_down bias"):
        export(flap, tmp_path / "flap.gguf")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf" or p.name.startswith(".")) == ["out.gguf"]


@needs_llama_cpp
def test_flap_bias_exported_for_llama(calib_file: Path, tmp_path: Path) -> None:
    """LLaMA's llama.cpp graph adds an ffn_down bias, so FLAP's bias is written and used."""
    folder = save_tiny(tmp_path / "llama", "llama")
    flap = tmp_path / "flap"
    llmprune.prune(str(folder), method="flap", sparsity=0.25, calib_dataset=str(calib_file), nsamples=4, seqlen=32,
                   output=str(flap))
    export(flap, tmp_path / "flap.gguf", type="f32")
    import gguf

    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "flap.gguf")).tensors}
    assert "blk.0.ffn_down.bias" in names
    _check_runs_like_torch(tmp_path / "flap.gguf", llmprune.load(flap, dtype="float32")[0], "f32")


def test_cli_export(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llmprune.cli import app

    folder = save_tiny(tmp_path / "llama", "llama")
    res = CliRunner().invoke(app, ["export", str(folder), "--format", "gguf", "--output", str(tmp_path / "m.gguf"),
                                   "--type", "f32"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.gguf").stat().st_size > 0
    res = CliRunner().invoke(app, ["export", str(folder), "--output", str(tmp_path / "m.gguf")])
    assert res.exit_code != 0 and "already exists" in " ".join(res.output.split())


# ------------------------------------------------------------------ the real SmolLM2

@needs_llama_cpp
@pytest.mark.slow
def test_smollm2_cfsp_export_runs_in_llama_cpp(smollm2, tmp_path: Path, data_dir: Path) -> None:
    """The built-in SmolLM2, CFSP 20% with per-layer widths: written as 'deci' at its own widths, the
    tokenizer copied from the source GGUF, llama.cpp's log-probs within f32 tolerance of PyTorch's."""
    run = tmp_path / "cfsp"
    llmprune.prune("smollm2-135m", method="cfsp", sparsity=0.2, calib_dataset="wikitext2", data_dir=str(data_dir),
                   nsamples=4, seqlen=64, output=str(run))
    result = export(run, tmp_path / "cfsp.gguf", type="f32")
    assert result.arch == "deci" and len(set(result.mlp_widths)) > 1 and "copied from" in result.tokenizer
    model, tok = llmprune.load(run, dtype="float32")
    ids = tok("The capital of France is Paris, and the capital of Italy is")["input_ids"]
    llm = _llama(tmp_path / "cfsp.gguf", f32_cache=True)  # f32 weights and an f32 KV cache (its default f16 cache: 1.1e-2)
    assert llm.tokenize(b"The capital of France is", add_bos=False) == tok("The capital of France is")["input_ids"]
    diff = float(np.abs(_lcpp_logprobs(llm, ids) - _torch_logprobs(model, ids)).max())
    assert diff < 2e-3, diff
    assert _lcpp_greedy(llm, ids, 6) == _torch_greedy(model, ids, 6)
    llm.close()
