"""The command line as a user meets it: messages instead of tracebacks, the plan line, help, quiet
output, interrupts. In-process through typer's CliRunner on a tiny local model; one subprocess
checks that importing the CLI does not import torch."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llmprune import cli
from llmprune.cli import app

from .conftest import save_tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    calib = root / "calib.txt"
    calib.write_text(" ".join(f"sentence number {i} talks about pruning models." for i in range(300)))
    return {"model": save_tiny(root / "tiny-llama", "llama"), "calib": calib, "root": root}


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))  # crash logs land here, not in ~/.cache
    monkeypatch.setenv("COLUMNS", "250")  # typer's help
    for console in (cli.console, cli.err):  # tables and messages: wide enough not to wrap what is asserted
        monkeypatch.setattr(console, "_width", 250)


def _base(tiny: dict[str, Path], data_dir: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(tiny["model"]), "--method", "wanda", "--sparsity", "0.5",
            "--calib-dataset", str(tiny["calib"]), "--nsamples", "2", "--seqlen", "16",
            "--data-dir", str(data_dir), *extra]


def _clean_error(result, code: int = 2) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


# --- 1. no traceback for bad input --------------------------------------------------------------
def test_plan_line_then_success(tiny: dict[str, Path], data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = runner.invoke(app, _base(tiny, data_dir, "--output", str(out), "--eval", "wikitext2", "--eval-seqlen", "32",
                                   "--eval-windows", "1"))
    assert res.exit_code == 0, res.output
    plan = next(line for line in res.output.splitlines() if line.startswith("plan:"))
    for part in ("model ", "method wanda (0.5 unstructured)", "calibration file:all 2 x 16 seed 0",
                 "evaluation wikitext2 32 x 1 windows", f"output {out}", "device cpu float32",
                 "3 layers, 32 calibration tokens"):
        assert part in plan, plan
    assert res.output.index("plan:") < res.output.index("pruned ppl")  # said before the work
    assert "sparsity (weights" in res.output
    # no output: said in the plan
    res = runner.invoke(app, _base(tiny, data_dir))
    assert res.exit_code == 0 and "output not saved" in res.output


@pytest.mark.parametrize(("args", "message"), [
    (["prune", "--sparsity", "0.5"], "--model and --method required"),
    (["prune", "--model", "x", "--sparsity", "0.5"], "--method required"),
])
def test_model_and_method_required(args: list[str], message: str) -> None:
    assert message in _clean_error(runner.invoke(app, args))


def test_recipe_can_name_model_and_method(tiny: dict[str, Path], data_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {tiny['model']}}}\nmethod: {{name: magnitude, sparsity: 0.5}}\n")
    res = runner.invoke(app, ["prune", "--recipe", str(recipe), "--data-dir", str(data_dir)])
    assert res.exit_code == 0, res.output
    assert "calibration none (data-free)" in res.output


@pytest.mark.parametrize("flags", [["--eval-windows", "1"], ["--eval-seqlen", "64"], ["--limit", "3"],
                                   ["--no-eval-dense"]])
def test_evaluation_flags_without_eval_are_an_error(tiny: dict[str, Path], data_dir: Path, flags: list[str]) -> None:
    out = _clean_error(runner.invoke(app, _base(tiny, data_dir, *flags)))
    assert f"{flags[0]} set how to evaluate, but nothing is evaluated" in out and "plan:" not in out


def test_did_you_mean(tiny: dict[str, Path], data_dir: Path) -> None:
    cases = [
        (["--method", "wandaa"], "did you mean wanda"),
        (["--calib-dataset", "wikitxt2"], "did you mean wikitext2"),
        (["--set", "calib.seqln=8"], "calib.seqln: unknown key (did you mean seqlen?)"),
        (["--set", "method.sequentail=layer"], "did you mean sequential"),
        (["--eval", "c44"], "did you mean c4"),
    ]
    for extra, message in cases:
        assert message in _clean_error(runner.invoke(app, _base(tiny, data_dir, *extra))), extra


def test_bad_files_and_paths(tiny: dict[str, Path], data_dir: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    out = _clean_error(runner.invoke(app, _base(tiny, data_dir, "--output", str(a_file / "run"))))
    assert "is a file, not a folder" in out and a_file.read_text() == "mine"
    out = _clean_error(runner.invoke(app, ["eval", "--model", str(tiny["model"]), "--data-dir", str(data_dir),
                                           "--json", str(a_file / "x.json")]))
    assert "is a file, not a folder" in out
    assert "does not exist" in _clean_error(runner.invoke(app, [*_base(tiny, data_dir), "--recipe", "/no/such.yaml"]))
    assert "not found" in _clean_error(runner.invoke(app, ["inspect", "/no/such/model"]))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed")
    assert "not valid YAML" in _clean_error(runner.invoke(app, [*_base(tiny, data_dir), "--recipe", str(bad_yaml)]))


def _gguf_header(version: int = 3, tensors: int = 1, kv: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, kv)


def test_gguf_files_are_checked(tiny: dict[str, Path], data_dir: Path, tmp_path: Path) -> None:
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip file")
    old = tmp_path / "old.gguf"
    old.write_bytes(_gguf_header(version=1))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(_gguf_header()[:-3])
    # a header whose one tensor (4x4 float32 = 64 bytes) lies beyond the end of the file
    name = b"w"
    table = struct.pack("<Q", len(name)) + name + struct.pack("<I", 2) + struct.pack("<QQ", 4, 4) + struct.pack("<IQ", 0, 0)
    short = tmp_path / "short.gguf"
    short.write_bytes(_gguf_header() + table + b"\0" * 10)
    for path, message in ((not_gguf, "is not a GGUF file"), (old, "GGUF version 1"),
                          (cut, "ends inside its header"), (short, "is truncated: its tensor table needs")):
        args = _base(tiny, data_dir)
        args[args.index("--model") + 1] = str(path)
        assert message in _clean_error(runner.invoke(app, args)), path
        assert message in _clean_error(runner.invoke(app, ["inspect", str(path)])), path


def test_unexpected_exception_names_a_log_file(tiny: dict[str, Path], data_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import llmprune.api

    def boom(**_: object) -> None:
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(llmprune.api, "prune", boom)
    res = runner.invoke(app, _base(tiny, data_dir))
    out = _clean_error(res, code=1)
    assert "internal error: RuntimeError: something nobody expected" in out
    logs = list((tmp_path / "cache" / "logs").glob("llmprune-*.log"))
    assert len(logs) == 1 and str(logs[0]) in out.replace("\n", "")
    assert "Traceback" in logs[0].read_text() and "boom" in logs[0].read_text()


def test_cuda_error_names_cpu(tiny: dict[str, Path], data_dir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert "--device cpu" in _clean_error(runner.invoke(app, _base(tiny, data_dir, "--device", "cuda")))


def test_offline_is_said_once_and_fast(tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from llmprune.data import sources

    monkeypatch.delenv("LLMPRUNE_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sources.hub_unreachable.cache_clear()
    try:
        args = ["prune", "--model", str(tiny["model"]), "--method", "wanda", "--sparsity", "0.5"]
        out = _clean_error(runner.invoke(app, args))
    finally:
        sources.hub_unreachable.cache_clear()
    assert out.count("error:") == 1 and "HF_HUB_OFFLINE is set" in out and "--data-dir" in out and "plan:" not in out


_FLAG_VALUES = st.one_of(st.integers(-3, 40).map(str), st.floats(-1.5, 1.5).map(str),
                         st.sampled_from(["", "abc", "2:4", "1:0", "0:4", "nan", "inf", "-1", "c4", "wikitext2", "auto",
                                          "cuda:7", "cpu,cpu", "float16", "bfloat16", "int8", "wanda", "magnitude",
                                          "/no/such", "[1, 2]", "{a: 1}", "true"]))
_FLAGS = ["--sparsity", "--pattern", "--nsamples", "--seqlen", "--seed", "--batch-size", "--dtype", "--device",
          "--method", "--calib-dataset", "--eval", "--eval-seqlen", "--eval-windows"]
_FIELDS = ["method.sparsity", "method.pattern", "method.sequential", "method.scope", "method.nonsense", "calib.nsamples",
           "calib.seqlen", "calib.offload", "calib.batch_size", "model.dtype", "model.stream", "eval.windows",
           "eval.dense", "eval.seqlen", "eval.datasets", "output", "overwrite", "data_dir", "nonsense", "calib"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=st.lists(st.tuples(st.sampled_from(_FLAGS), _FLAG_VALUES), max_size=3),
       fields=st.lists(st.tuples(st.sampled_from(_FIELDS), _FLAG_VALUES), max_size=3))
def test_random_flags_and_recipe_fields(tiny: dict[str, Path], data_dir: Path, flags: list[tuple[str, str]],
                                        fields: list[tuple[str, str]]) -> None:
    """Whatever a user types gets a message with exit code 2, or works: never a traceback, never exit 1."""
    args = _base(tiny, data_dir)
    for flag, value in flags:
        if flag in ("--seqlen", "--eval-seqlen") and value.lstrip("-").isdigit() and int(value) > 40:
            value = "40"
        args += [flag, value]
    if any(f.startswith("--eval-") for f, _ in flags) and not any(f == "--eval" for f, _ in flags):
        args += ["--eval", "wikitext2"]  # half the time the evaluation flags come with something to evaluate
    for key, value in fields:
        if key in ("output", "data_dir"):
            value = "/no/such/dir" if value.startswith("/") else value
        args += ["--set", f"{key}={value}"]
    args += ["--set", "eval.windows=1"] if "eval.windows" not in {k for k, _ in fields} else []
    res = runner.invoke(app, args)
    assert res.exit_code in (0, 2), (args, res.output, res.exception)
    assert "Traceback" not in res.output, (args, res.output)
    if res.exit_code == 2:
        assert "error" in res.output.lower() or "usage" in res.output.lower(), (args, res.output)


# --- 2./3. help, version, start-up ----------------------------------------------------------------
def test_cli_import_does_not_import_torch() -> None:
    code = ("import sys, llmprune, llmprune.cli; "
            "heavy = [m for m in ('torch', 'transformers', 'pydantic', 'numpy') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_quiet_by_default_verbose_shows_the_libraries(tiny: dict[str, Path]) -> None:
    """A real process (real stderr): transformers' "Loading weights" bar and warnings only with -v; our bars stay."""
    args = [sys.executable, "-c", "from llmprune.cli import main; main()", "eval", "--model", str(tiny["model"]),
            "--eval", str(tiny["calib"]), "--eval-seqlen", "32", "--eval-windows", "1"]
    quiet = subprocess.run(args, capture_output=True, text=True, check=True)
    loud = subprocess.run([*args, "-v"], capture_output=True, text=True, check=True)
    assert "ppl" in quiet.stdout and "eval calib ppl" in quiet.stderr  # the table, and our own progress bar
    for noise in ("Loading weights", "Warning", "INFO"):
        assert noise not in quiet.stderr, quiet.stderr
    assert "Loading weights" in loud.stderr, loud.stderr


def test_lazy_names_are_the_functions() -> None:
    """Importing a submodule first must not shadow a public function of the same name (llmprune.export)."""
    code = ("import llmprune.deploy.to_gguf, llmprune.recovery, llmprune; "
            "print(all(callable(getattr(llmprune, n)) for n in ('export', 'recover', 'sweep', 'prune', 'load')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", out.stdout + out.stderr


def test_version_and_help() -> None:
    from llmprune import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"llmprune {__version__}"
    for command in ("prune", "eval", "sweep", "inspect", "methods", "report", "recover", "export"):
        res = runner.invoke(app, [command, "--help"])
        assert res.exit_code == 0 and "Examples:" in res.output and f"llmprune {command}" in res.output, command
    res = runner.invoke(app, ["prune", "--help"])
    for needle in ("--seed", "random seed", "--dtype", "bfloat16", "[default: (2048)]", "[default: (c4)]",
                   "wanda, wanda-sp"):
        assert needle in res.output, needle


def test_help_defaults_match_the_recipe() -> None:
    from llmprune.methods import METHODS
    from llmprune.recipe import Recipe

    recipe = Recipe().to_dict()
    for key, value in cli.DEFAULTS.items():
        section, field = key.split(".")
        assert recipe[section][field] == value, key
    assert tuple(METHODS.names()) == cli.METHOD_NAMES


def test_methods_in_full() -> None:
    res = runner.invoke(app, ["methods", "barber"])
    assert res.exit_code == 0, res.output
    assert "calibration: calibration text" in res.output and "gradients" in res.output
    for option in ("init", "ratio", "granularity", "reconstruct_solver", "fraction of the beneficial swaps applied"):
        assert option in res.output
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0 and "data-free" in res.output  # magnitude
    assert "did you mean barber" in _clean_error(runner.invoke(app, ["methods", "barbr"]))


def test_inspect_shows_the_model_and_the_run(tiny: dict[str, Path], data_dir: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["inspect", str(tiny["model"])])
    assert res.exit_code == 0, res.output
    for needle in ("parameters", "float32", "4 / 2", "per layer", "MLP width", "128"):
        assert needle in res.output, needle
    out = tmp_path / "cfsp"
    res = runner.invoke(app, ["prune", "--model", str(tiny["model"]), "--method", "cfsp", "--sparsity", "0.25",
                              "--calib-dataset", str(tiny["calib"]), "--nsamples", "2", "--seqlen", "16",
                              "--data-dir", str(data_dir), "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert "0.25 of the MLP channels" in res.output and "MLP channels removed" in res.output
    assert "sparsity (weights" not in res.output  # a structured run's unit is channels and parameters
    res = runner.invoke(app, ["inspect", str(out), "--json"])
    desc = json.loads(res.output)
    assert desc["llmprune"]["method"] == "cfsp" and desc["llmprune"]["base_model"] == tiny["model"].name  # no absolute paths in published files
    assert sum(layer["mlp_width"] for layer in desc["per_layer"]) < 3 * 128


def test_seqlen_beyond_context_warns(tiny: dict[str, Path], data_dir: Path) -> None:
    args = _base(tiny, data_dir)
    args[args.index("--seqlen") + 1] = "300"  # the tiny model's context is 256
    args[args.index("--nsamples") + 1] = "1"
    res = runner.invoke(app, args)
    assert "longer than the model's context (256 tokens)" in res.output, res.output


# --- 5. interrupts ------------------------------------------------------------------------------
def test_ctrl_c_says_where_it_stopped(tiny: dict[str, Path], data_dir: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from llmprune.methods.magnitude import Magnitude

    real = Magnitude.prune_layer

    def interrupt_at_layer_2(self, ctx):  # type: ignore[no-untyped-def]
        if ctx.layer.index == 1:
            raise KeyboardInterrupt
        return real(self, ctx)

    monkeypatch.setattr(Magnitude, "prune_layer", interrupt_at_layer_2)
    out = tmp_path / "run"
    res = runner.invoke(app, [*_base(tiny, data_dir, "--output", str(out)), "--method", "magnitude"])
    assert res.exit_code == cli.EXIT_INTERRUPTED, res.output
    assert "interrupted at layer 2/3 (magnitude); nothing written" in res.output and not out.exists()


def test_interrupt_messages_for_resumable_work() -> None:
    from llmprune.activity import interrupt_message

    assert interrupt_message({"stage": "steps", "step": 7, "steps": 20, "partial": "out.partial",
                              "checkpoint_step": 5}) == (
        "interrupted at step 7/20; checkpoint at step 5 in out.partial; re-run the same command to resume")
    assert "no checkpoint yet in out.partial" in interrupt_message(
        {"stage": "steps", "step": 1, "steps": 20, "partial": "out.partial", "checkpoint_step": 0})
    assert interrupt_message({"stage": "layers", "layer": 4, "layers": 30, "partial": "o.partial", "layers_done": 3}) == (
        "interrupted at layer 4/30; 3 finished layer(s) kept in o.partial; re-run the same command to resume")


def test_streamed_prune_interrupt_names_the_partial_folder(tiny: dict[str, Path], data_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from llmprune.methods.magnitude import Magnitude

    real = Magnitude.prune_layer

    def interrupt_at_layer_3(self, ctx):  # type: ignore[no-untyped-def]
        if ctx.layer.index == 2:
            raise KeyboardInterrupt
        return real(self, ctx)

    monkeypatch.setattr(Magnitude, "prune_layer", interrupt_at_layer_3)
    out = tmp_path / "streamed"
    args = [*_base(tiny, data_dir, "--output", str(out), "--stream"), "--method", "magnitude"]
    res = runner.invoke(app, args)
    assert res.exit_code == cli.EXIT_INTERRUPTED, res.output
    assert f"in {out.parent / ('.' + out.name + '.partial')}; re-run the same command to resume" in \
        res.output.replace("\n", "")
    assert "interrupted at layer 3/3" in res.output
    monkeypatch.setattr(Magnitude, "prune_layer", real)
    res = runner.invoke(app, args)  # the same command resumes and finishes
    assert res.exit_code == 0, res.output
    assert (out / "llmprune.json").is_file() and json.loads((out / "llmprune.json").read_text())["streaming"][
        "resumed_at_layer"] == 2
