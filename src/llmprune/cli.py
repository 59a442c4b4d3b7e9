"""``llmprune`` command line: parses flags into a recipe and calls the API. Nothing else lives here.

Every command goes through :func:`command` (one place for errors, interrupts and output noise):

- an expected failure (:class:`LLMPruneError`, a bad flag value, a bad recipe field, a missing
  file) prints one message and exits 2; click's own usage errors exit 2 as well;
- an unexpected exception prints one line naming it and a log file with the full traceback, exit 1;
- Ctrl-C says where the work stopped and what was (not) written (:mod:`llmprune.activity`), exit 130;
- third-party progress bars, warnings and INFO lines are off unless ``-v``; ours stay.

torch and transformers are imported inside the commands, never here: ``llmprune --help`` and
``--version`` start in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from .errors import LLMPruneError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="One-shot pruning of large language models: prune, evaluate, sweep, compare, recover.")
console = Console(stderr=False)
err = Console(stderr=True)

# The recipe's defaults, shown in --help without importing the recipe module (pydantic) at start-up;
# tests/test_cli.py checks that they match llmprune.recipe.
METHOD_NAMES = ("barber", "cfsp", "expert-frequency", "flap", "magnitude", "magnitude-sp", "reap", "sparsegpt", "wanda",
                "wanda-sp")
DEFAULTS = {"calib.dataset": "c4", "calib.nsamples": 128, "calib.seqlen": 2048, "calib.seed": 0,
            "calib.batch_size": 1, "eval.seqlen": 2048, "eval.dense": True, "model.dtype": "auto",
            "model.device": "auto", "model.stream": "auto"}
DTYPES = "auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16"
DEVICES = "auto, cpu, cuda, cuda:N, or a list cuda:0,cuda:1 (all share the calibration forwards)"
EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130


def examples(*lines: str) -> str:
    """A subcommand's epilog: its examples, one per paragraph (rich keeps them apart)."""
    return "Examples:\n\n" + "\n\n".join(f"  $ {line}" for line in lines)


# --- options several commands share ------------------------------------------------------------
def opt_verbose() -> Any:
    return typer.Option(False, "--verbose", "-v", help="also show transformers' loading bars, library warnings and "
                        "debug logs")


def opt_data_dir() -> Any:
    return typer.Option(None, "--data-dir", help="local mirror of the datasets (or set LLMPRUNE_DATA_DIR); "
                        "needed when the Hugging Face Hub is unreachable", show_default="the Hub")


def opt_nsamples() -> Any:
    return typer.Option(None, "--nsamples", help="number of calibration windows",
                        show_default=str(DEFAULTS["calib.nsamples"]))


def opt_seqlen() -> Any:
    return typer.Option(None, "--seqlen", help="calibration window length in tokens",
                        show_default=str(DEFAULTS["calib.seqlen"]))


def opt_seed(default: int | None = None) -> Any:
    return typer.Option(default, "--seed", help="random seed of the calibration/evaluation sampling",
                        show_default=str(DEFAULTS["calib.seed"]) if default is None else True)


def opt_dtype(default: str | None = None) -> Any:
    return typer.Option(default, "--dtype", help=f"weights' dtype: {DTYPES}",
                        show_default=str(DEFAULTS["model.dtype"]) if default is None else True)


def opt_device(default: str | None = None) -> Any:
    return typer.Option(default, "--device", help=f"compute device: {DEVICES}",
                        show_default=str(DEFAULTS["model.device"]) if default is None else True)


# --- one place for errors, interrupts and output noise -------------------------------------------
def log_dir() -> Path:
    return Path(os.environ.get("LLMPRUNE_CACHE", Path.home() / ".cache" / "llmprune")) / "logs"


def _fail(exc: BaseException) -> None:
    err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(EXIT_USAGE)


def _crash(exc: BaseException) -> None:
    """An exception nobody expected: one line for the user, the traceback in a log file."""
    text = "".join(traceback.format_exception(exc))
    try:
        folder = log_dir()
        folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = folder / f"llmprune-{stamp}-{os.getpid()}.log"
        path.write_text(f"llmprune {' '.join(sys.argv[1:])}\n\n{text}", encoding="utf-8")
        where = f"the full traceback is in {path}"
    except OSError:
        where = "the traceback could not be written to a log file:\n" + text
    err.print(f"[bold red]internal error:[/bold red] {type(exc).__name__}: {exc}; {where} "
              f"(please report it)", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BUG)


def _setup_logging(verbose: bool) -> None:
    """Our loggers at INFO (DEBUG with -v); every other library's at ERROR (WARNING with -v)."""
    logging.basicConfig(level=logging.WARNING if verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("llmprune").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not logging.getLogger().handlers:  # basicConfig did nothing (a host set up logging): still be heard
        logging.getLogger("llmprune").addHandler(logging.StreamHandler(sys.stderr))
    for noisy in ("httpx", "huggingface_hub", "urllib3", "filelock", "matplotlib", "PIL", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)


@contextlib.contextmanager
def _quiet_libraries(verbose: bool, models: bool) -> Iterator[None]:
    """Third-party bars, warnings and INFO lines off for the command (restored afterwards)."""
    if verbose:
        yield
        return
    env = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TOKENIZERS_PARALLELISM": "false"}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    restore: list[Callable[[], None]] = []
    if models:  # these commands import transformers anyway; its bar switch is read when a bar starts
        from transformers.utils import logging as tf_logging

        level, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
        restore.append(lambda: tf_logging.set_verbosity(level))
        if bars:
            restore.append(tf_logging.enable_progress_bar)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for undo in restore:
            undo()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


F = TypeVar("F", bound=Callable[..., Any])


def command(models: bool = True) -> Callable[[F], F]:
    """Wrap a command: logging, quiet libraries, and every failure turned into a message and an exit code."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            from . import activity

            verbose = bool(kwargs.get("verbose", False))
            _setup_logging(verbose)
            activity.clear()
            try:
                with _quiet_libraries(verbose, models):
                    return fn(*args, **kwargs)
            except LLMPruneError as exc:
                _fail(exc)
            except KeyboardInterrupt:
                err.print(f"[bold yellow]{activity.interrupt_message()}[/bold yellow]", highlight=False, soft_wrap=True)
                raise typer.Exit(EXIT_INTERRUPTED) from None
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except Exception as exc:
                from click.exceptions import ClickException

                if isinstance(exc, ClickException):
                    raise
                _crash(exc)
            finally:
                activity.clear()

        return run  # type: ignore[return-value]

    return wrap


def _version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"llmprune {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                 help="print the version and exit"),
) -> None:
    """One-shot pruning of large language models: prune, evaluate, sweep, compare, recover."""


def _announce(summary: Any) -> None:
    """Print the plan line (and its warnings) before any work."""
    err.print(f"[bold]plan:[/bold] {summary.text}", highlight=False, soft_wrap=True)
    for warning in summary.warnings:
        err.print(f"[bold yellow]warning:[/bold yellow] {warning}", highlight=False, soft_wrap=True)


def _given(key: str, base: dict[str, Any], flag: Any, overrides: list[tuple[str, Any]]) -> bool:
    """Whether a recipe field is set by a flag, the recipe file or --set."""
    if flag is not None or any(k == key for k, _ in overrides):
        return True
    node: Any = base
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return node is not None


def _ppl_table(title: str, report: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("dataset")
    table.add_column("seqlen", justify="right")
    table.add_column("windows", justify="right")
    has_dense = "eval_dense" in report
    if has_dense:
        table.add_column("dense ppl", justify="right")
    table.add_column("ppl" if not has_dense else "pruned ppl", justify="right")
    for name, res in report.get("eval", {}).items():
        row = [name, str(res["seqlen"]), f"{res['windows']}/{res['windows_available']}"]
        if has_dense:
            row.append(f"{report['eval_dense'][name]['ppl']:.3f}")
        row.append(f"{res['ppl']:.3f}")
        table.add_row(*row)
    return table


def _zeroshot_table(title: str, report: dict[str, Any]) -> Table | None:
    zs = report.get("zeroshot")
    if not zs:
        return None
    dense = (report.get("zeroshot_dense") or {}).get("tasks", {})
    table = Table(title=title)
    table.add_column("task")
    table.add_column("docs", justify="right")
    if dense:
        table.add_column("dense acc", justify="right")
    table.add_column("acc", justify="right")
    table.add_column("acc_norm", justify="right")

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    for name, res in zs["tasks"].items():
        row = [name, str(res["samples"])]
        if dense:
            row.append(fmt(dense.get(name, {}).get("acc")))
        table.add_row(*row, fmt(res["acc"]), fmt(res["acc_norm"]))
    if len(zs["tasks"]) > 1:
        row = ["mean", ""]
        if dense:
            row.append(fmt(report["zeroshot_dense"]["mean"]["acc"]))
        table.add_row(*row, fmt(zs["mean"]["acc"]), fmt(zs["mean"]["acc_norm"]))
    settings = zs["settings"]
    table.caption = (f"lm-eval {zs['versions']['lm_eval']}, {settings['num_fewshot']}-shot"
                     + (f", first {settings['limit']} documents per task" if settings["limit"] else ""))
    return table


def _print_tables(title: str, report: dict[str, Any]) -> None:
    if report.get("eval"):
        console.print(_ppl_table(title, report))
    table = _zeroshot_table(f"zero-shot: {title}", report)
    if table is not None:
        console.print(table)


def _check_eval_flags(rec: Any, **flags: Any) -> None:
    """Evaluation settings without anything to evaluate would be silently ignored: refuse them."""
    given = {k: v for k, v in flags.items() if v is not None}
    names = {"eval_seqlen": "--eval-seqlen", "eval_windows": "--eval-windows",
             "eval_dense": "--eval-dense" if given.get("eval_dense") else "--no-eval-dense", "limit": "--limit"}
    problems = []
    if not rec.eval.datasets:
        problems += [names[k] for k in ("eval_seqlen", "eval_windows") if k in given]
    if not rec.eval.tasks and "limit" in given:
        problems.append(names["limit"])
    if not rec.eval.datasets and not rec.eval.tasks and "eval_dense" in given:
        problems.append(names["eval_dense"])
    if problems:
        raise LLMPruneError(f"{', '.join(problems)} set how to evaluate, but nothing is evaluated: add --eval "
                            f"wikitext2 (perplexity) or --tasks offline (zero-shot), or drop {', '.join(problems)}")


@app.command(epilog=examples(
    "llmprune prune --model smollm2-135m --method wanda --sparsity 0.5 --output runs/wanda50",
    "llmprune prune --model smollm2-135m --method sparsegpt --pattern 2:4 --eval wikitext2 --eval-windows 8",
    "llmprune prune --model ./my-model --method cfsp --sparsity 0.2 --set method.attention=0.25 --output runs/cfsp20",
    "llmprune prune --recipe recipe.yaml --set calib.nsamples=32",
))
@command()
def prune(
    model: str | None = typer.Option(None, "--model", help="what to prune: a Hub id, a local folder, a .gguf file or "
                                     "the built-in smollm2-135m (required unless the recipe names it)",
                                     show_default=False),
    method: str | None = typer.Option(None, "--method", help=f"pruning method: {', '.join(METHOD_NAMES)} (see "
                                      f"`llmprune methods NAME`; required unless the recipe names it)",
                                      show_default=False),
    sparsity: float | None = typer.Option(None, "--sparsity", help="fraction to remove, in [0, 1): of the weights "
                                          "(unstructured), of the MLP channels (structured methods)",
                                          show_default=False),
    pattern: str | None = typer.Option(None, "--pattern", help="N:M semi-structured pattern (keep N of every M "
                                       "weights), e.g. 2:4; instead of --sparsity", show_default="unstructured"),
    output: str | None = typer.Option(None, "--output", help="folder to write the pruned model and llmprune.json into",
                                      show_default="not saved"),
    calib_dataset: str | None = typer.Option(None, "--calib-dataset", help="calibration text: c4, wikitext2 "
                                             "(optionally :split) or a local .txt/.jsonl/.json/.parquet file",
                                             show_default=str(DEFAULTS["calib.dataset"])),
    nsamples: int | None = opt_nsamples(),
    seqlen: int | None = opt_seqlen(),
    seed: int | None = opt_seed(),
    data_dir: str | None = opt_data_dir(),
    eval_: str | None = typer.Option(None, "--eval", help="perplexity datasets after pruning, comma-separated: "
                                     "wikitext2, c4 or files", show_default="none"),
    eval_seqlen: int | None = typer.Option(None, "--eval-seqlen", help="evaluation window length in tokens "
                                           "(needs --eval)", show_default=str(DEFAULTS["eval.seqlen"])),
    eval_windows: int | None = typer.Option(None, "--eval-windows", help="evaluate only the first N windows "
                                            "(needs --eval)", show_default="all"),
    eval_dense: bool | None = typer.Option(None, "--eval-dense/--no-eval-dense", help="also evaluate the model "
                                           "before pruning (needs --eval or --tasks)", show_default="on"),
    tasks: str | None = typer.Option(None, "--tasks", help="zero-shot lm-eval tasks: paper (the seven paper tasks), "
                                     "offline (shipped, no network) or task names", show_default="none"),
    limit: int | None = typer.Option(None, "--limit", help="zero-shot: score the first N documents per task "
                                     "(needs --tasks)", show_default="all"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder (only once the new "
                                   "one is complete)"),
    recipe: Path | None = typer.Option(None, "--recipe", help="YAML recipe, or a run folder (or its llmprune.json) "
                                       "to re-run; flags and --set override it", show_default="none"),
    set_: list[str] | None = typer.Option(None, "--set", help="override any recipe field: key=value, e.g. "
                                          "method.block_size=64 (repeatable)", show_default="none"),
    preset: str | None = typer.Option(None, "--preset", help="best: the lowest-perplexity configuration measured "
                                      "for --sparsity / --pattern (chooses the method); faithful: --method as its "
                                      "released code runs it. Flags and --set override its options",
                                      show_default="none"),
    dtype: str | None = opt_dtype(),
    device: str | None = opt_device(),
    batch_size: int | None = typer.Option(None, "--batch-size", help="calibration windows per forward",
                                          show_default=str(DEFAULTS["calib.batch_size"])),
    stream: bool | None = typer.Option(None, "--stream/--no-stream", help="prune one layer at a time from the "
                                       "checkpoint's shards into the output, resumably",
                                       show_default="when the checkpoint does not fit in memory"),
    uniform: bool = typer.Option(False, "--uniform", help="structured methods: every layer the same width, so stock "
                                 "from_pretrained loads the output"),
    round_to: int | None = typer.Option(None, "--round-to", help="structured methods: round each layer's kept width "
                                        "to a multiple of N (e.g. 128)", show_default="no rounding"),
    verbose: bool = opt_verbose(),
) -> None:
    """Prune a model in one shot; report sparsity, perplexity, time and memory.

    A plan line says what will be done before any work starts.
    """
    from .api import fields_from_kwargs
    from .api import prune as api_prune
    from .recipe import build_recipe, load_recipe_dict, parse_set

    if preset is not None:
        from .presets import check_name

        check_name(preset)
    base = load_recipe_dict(recipe) if recipe else {}
    overrides = parse_set(set_)
    missing = [flag for key, flag, value in (("model.name", "--model", model), ("method.name", "--method", method))
               if not _given(key, base, value, overrides) and not (key == "method.name" and preset == "best")]
    if missing:
        raise LLMPruneError(f"{' and '.join(missing)} required: say what to prune and how, e.g. --model smollm2-135m "
                            f"--method wanda (methods: {', '.join(METHOD_NAMES)}), or --preset best to use the best measured method")
    flags = {
        "model": model, "method": method, "sparsity": sparsity, "pattern": pattern, "output": output,
        "calib_dataset": calib_dataset, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
        "data_dir": data_dir, "eval": eval_, "eval_seqlen": eval_seqlen, "eval_windows": eval_windows,
        "eval_dense": eval_dense, "overwrite": overwrite or None, "dtype": dtype, "device": device,
        "batch_size": batch_size, "tasks": tasks, "limit": limit, "stream": stream,
        "uniform": uniform or None, "round_to": round_to,
    }
    rec = build_recipe(base, fields_from_kwargs(flags), overrides, preset=preset)
    if recipe:
        from .io.rerun import check_rerun

        check_rerun(recipe, rec)
    _check_eval_flags(rec, eval_seqlen=eval_seqlen, eval_windows=eval_windows, eval_dense=eval_dense, limit=limit)
    result = api_prune(recipe=rec, progress=True, announce=_announce)
    rep = result.report
    _print_tables(f"{rep['method']} on {rep['model']}", rep)
    summary = Table(show_header=False)
    if "structure" not in rep:  # structured runs remove channels: their unit is channels and parameters, below
        summary.add_row("sparsity (weights of the decoder linears)", f"{rep['sparsity']['overall']:.4f}")
    if "nm_valid" in rep["sparsity"]:
        summary.add_row(f"{rep['sparsity']['pattern']} valid", str(rep["sparsity"]["nm_valid"]))
    if "structure" in rep:
        st = rep["structure"]
        summary.add_row("MLP channels removed", f"{st['mlp_channels']['removed_fraction']:.4f} "
                        f"({st['mlp_channels']['dense'] - st['mlp_channels']['kept']:,} of {st['mlp_channels']['dense']:,})")
        if "attention" in st:
            summary.add_row("KV groups removed", f"{st['attention']['removed_fraction']:.4f}")
        summary.add_row("parameters removed", f"{st['params']['removed_fraction']:.4f} "
                        f"({st['params']['dense']:,} -> {st['params']['pruned']:,})")
    summary.add_row("parameters", f"{rep['params']['total']:,}")
    summary.add_row("prune time", f"{rep['timings']['prune_s']:.1f} s")
    summary.add_row("peak RSS", f"{rep['memory']['peak_rss_mb']:.0f} MB")
    summary.add_row("output", str(result.output) if result.output else "(not saved; pass --output)")
    console.print(summary)
    note = rep.get("loading") or {}
    if note.get("stock_from_pretrained") is False:
        console.print("[bold yellow]note:[/bold yellow] stock AutoModelForCausalLM.from_pretrained cannot load this "
                  f"model ({'; '.join(note['why'])}); load it with {note['load_with']}, or: "
                  + "; or ".join(note["ways_out"]), highlight=False)


@app.command("eval", epilog=examples(
    "llmprune eval --model runs/wanda50 --eval wikitext2 --eval-windows 8 --json runs/wanda50-eval.json",
    "llmprune eval --model smollm2-135m --tasks offline --limit 100",
    "llmprune eval --model runs/cfsp20 --tasks paper --num-fewshot 0",
))
@command()
def eval_cmd(
    model: str = typer.Option(..., "--model", help="a model (Hub id, folder, .gguf, smollm2-135m) or a run folder "
                              "written by llmprune (its llmprune.json says what was done to it)"),
    tasks: str | None = typer.Option(None, "--tasks", help="zero-shot lm-eval tasks, comma-separated: paper (the "
                                     "seven paper tasks), offline (shipped, no network) or any lm-eval task",
                                     show_default="none"),
    eval_: str | None = typer.Option(None, "--eval", help="perplexity datasets, comma-separated: wikitext2, c4 or "
                                     "files", show_default="wikitext2 when no --tasks"),
    eval_seqlen: int = typer.Option(2048, "--eval-seqlen", help="evaluation window length in tokens"),
    eval_windows: int | None = typer.Option(None, "--eval-windows", help="evaluate only the first N windows",
                                            show_default="all"),
    limit: int | None = typer.Option(None, "--limit", help="zero-shot: score the first N documents per task",
                                     show_default="all"),
    num_fewshot: int = typer.Option(0, "--num-fewshot", help="zero-shot: in-context examples (papers: 0)"),
    batch_size: int = typer.Option(8, "--batch-size", help="zero-shot: requests per forward"),
    include_path: str | None = typer.Option(None, "--include-path", help="folder of your own lm-eval task YAMLs",
                                            show_default="none"),
    seed: int = opt_seed(0),
    data_dir: str | None = opt_data_dir(),
    json_out: Path | None = typer.Option(None, "--json", help="write the report to this JSON file (for "
                                         "`llmprune report`)", show_default="not written"),
    dtype: str = opt_dtype("auto"),
    device: str = opt_device("auto"),
    verbose: bool = opt_verbose(),
) -> None:
    """Perplexity and zero-shot accuracy (lm-eval) of a model or a pruned run folder."""
    from .api import evaluate
    from .io.save import check_parent, write_json_atomic

    if json_out is not None:
        check_parent(json_out, "--json")
        if json_out.is_dir():
            raise LLMPruneError(f"--json {json_out} is a folder; name a file, e.g. {json_out / 'eval.json'}")
    if eval_windows is not None and eval_ is None and tasks is not None:
        raise LLMPruneError("--eval-windows sets perplexity windows, but only --tasks is evaluated: add --eval wikitext2")
    if limit is not None and tasks is None:
        raise LLMPruneError("--limit sets zero-shot documents per task, but no --tasks are given: add --tasks offline")
    rep = evaluate(model, datasets=eval_, seqlen=eval_seqlen, windows=eval_windows, tasks=tasks, limit=limit,
                   num_fewshot=num_fewshot, batch_size=batch_size, include_path=include_path, seed=seed,
                   data_dir=data_dir, dtype=dtype, device=device, progress=True)
    _print_tables(f"{model}", rep)
    run = rep.get("run") or {}
    if run.get("structure"):
        st = run["structure"]
        console.print(f"structured run ({run.get('method')} on {run.get('base_model')}): "
                      f"{st['params']['removed_fraction']:.4f} of the parameters removed "
                      f"({st['params']['dense']:,} -> {st['params']['pruned']:,})", highlight=False)
    elif run:
        console.print(f"run: {run.get('method')} on {run.get('base_model')}; sparsity (weights of the decoder "
                      f"linears) {rep['sparsity']['overall']:.4f}", highlight=False)
    elif rep.get("sparsity"):
        console.print(f"sparsity (weights of the decoder linears): {rep['sparsity']['overall']:.4f}", highlight=False)
    if json_out:
        write_json_atomic(json_out, rep)
        console.print(f"report written to {json_out}", highlight=False)


@app.command(epilog=examples(
    "llmprune sweep --model smollm2-135m --method wanda --sparsities 0.3,0.5,0.7 --eval wikitext2 --output runs/sweep",
    "llmprune sweep --model smollm2-135m --method barber --param method.ratio --values 0.005,0.01 --output runs/r",
    "llmprune sweep ... --resume   (continue an interrupted sweep with the same command)",
))
@command()
def sweep(
    model: str | None = typer.Option(None, "--model", help="what to prune: a Hub id, a local folder, a .gguf file or "
                                     "the built-in smollm2-135m", show_default="smollm2-135m"),
    method: str | None = typer.Option(None, "--method", help=f"pruning method: {', '.join(METHOD_NAMES)}",
                                      show_default="wanda"),
    sparsities: str | None = typer.Option(None, "--sparsities", help="comma-separated sparsities, e.g. 0.3,0.5,0.7",
                                          show_default="none"),
    param: str = typer.Option("method.sparsity", "--param", help="the recipe field to sweep (with --values)"),
    values: str | None = typer.Option(None, "--values", help="comma-separated values of --param", show_default="none"),
    output: str | None = typer.Option(None, "--output", help="sweep folder: one run folder per point + sweep.json",
                                      show_default="not saved"),
    pattern: str | None = typer.Option(None, "--pattern", help="N:M pattern of every point, e.g. 2:4",
                                       show_default="unstructured"),
    calib_dataset: str | None = typer.Option(None, "--calib-dataset", help="calibration text: c4, wikitext2 or a "
                                             "local file", show_default=str(DEFAULTS["calib.dataset"])),
    nsamples: int | None = opt_nsamples(),
    seqlen: int | None = opt_seqlen(),
    seed: int | None = opt_seed(),
    data_dir: str | None = opt_data_dir(),
    eval_: str | None = typer.Option(None, "--eval", help="perplexity datasets, comma-separated", show_default="none"),
    eval_seqlen: int | None = typer.Option(None, "--eval-seqlen", help="evaluation window length (needs --eval)",
                                           show_default=str(DEFAULTS["eval.seqlen"])),
    eval_windows: int | None = typer.Option(None, "--eval-windows", help="evaluate only the first N windows "
                                            "(needs --eval)", show_default="all"),
    eval_dense: bool | None = typer.Option(None, "--eval-dense/--no-eval-dense", help="also evaluate the dense "
                                           "model once", show_default="on"),
    tasks: str | None = typer.Option(None, "--tasks", help="zero-shot lm-eval tasks: paper, offline or names",
                                     show_default="none"),
    limit: int | None = typer.Option(None, "--limit", help="zero-shot: first N documents per task (needs --tasks)",
                                     show_default="all"),
    save_models: bool = typer.Option(True, "--save-models/--reports-only", help="write each point's weights"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted sweep with the same settings"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing sweep folder when done"),
    recipe: Path | None = typer.Option(None, "--recipe", help="YAML recipe; flags and --set override it",
                                       show_default="none"),
    set_: list[str] | None = typer.Option(None, "--set", help="override any recipe field: key=value",
                                          show_default="none"),
    dtype: str | None = opt_dtype(),
    device: str | None = opt_device(),
    verbose: bool = opt_verbose(),
) -> None:
    """Prune one model at several sparsities (or values of any method field): one run folder per point."""
    from .api import fields_from_kwargs
    from .recipe import build_recipe, load_recipe_dict, parse_set
    from .sweeps import sweep as api_sweep

    if (sparsities is None) == (values is None):
        raise LLMPruneError("give the points with --sparsities 0.3,0.5 or with --param FIELD --values V1,V2")
    if sparsities is not None and param != "method.sparsity":
        raise LLMPruneError("--sparsities sweeps method.sparsity; use --values with --param")
    base = load_recipe_dict(recipe) if recipe else {}
    flags = {
        "model": model, "method": method, "pattern": pattern, "calib_dataset": calib_dataset,
        "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "data_dir": data_dir, "eval": eval_,
        "eval_seqlen": eval_seqlen, "eval_windows": eval_windows, "eval_dense": eval_dense, "tasks": tasks,
        "limit": limit, "dtype": dtype, "device": device,
    }
    rec = build_recipe(base, fields_from_kwargs(flags), parse_set(set_))
    _check_eval_flags(rec, eval_seqlen=eval_seqlen, eval_windows=eval_windows, eval_dense=eval_dense, limit=limit)
    result = api_sweep(recipe=rec, values=sparsities if sparsities is not None else values or "",
                       parameter=param, output=output, overwrite=overwrite, resume=resume,
                       save_models=save_models, progress=True)
    table = Table(title=f"sweep of {param} ({len(result.reports)} points) -> {result.output}",
                  caption="achieved: sparsity of the decoder linears (structured: removed parameter fraction)")
    table.add_column(param.rsplit(".", 1)[-1], justify="right")
    table.add_column("achieved", justify="right")
    table.add_column("params", justify="right")
    datasets = list(result.reports[0].get("eval", {})) if result.reports else []
    for name in datasets:
        table.add_column(f"{name} ppl", justify="right")
    has_zs = any("zeroshot" in r for r in result.reports)
    if has_zs:
        table.add_column("zero-shot acc", justify="right")
    table.add_column("prune s", justify="right")
    table.add_column("folder", overflow="fold")
    for rep in result.reports:
        achieved = (f"{rep['structure']['params']['removed_fraction']:.4f} params" if "structure" in rep
                    else f"{rep['sparsity']['overall']:.4f}")
        row = [str(rep["sweep"]["value"]), achieved, f"{rep['params']['total']:,}"]
        row += [f"{rep['eval'][n]['ppl']:.3f}" for n in datasets]
        if has_zs:
            mean = rep.get("zeroshot", {}).get("mean", {}).get("acc")
            row.append("-" if mean is None else f"{mean:.4f}")
        row += [f"{rep['timings']['prune_s']:.1f}" + (" (shared)" if rep.get("statistics_reused") else ""),
                rep["sweep"]["folder"]]
        table.add_row(*row)
    first = result.reports[0] if result.reports else {}
    dense = [f"{n} ppl {r['ppl']:.3f}" for n, r in (first.get("eval_dense") or {}).items()]
    if (first.get("zeroshot_dense") or {}).get("mean", {}).get("acc") is not None:
        dense.append(f"zero-shot acc {first['zeroshot_dense']['mean']['acc']:.4f}")
    if dense:
        table.caption += "; dense: " + ", ".join(dense)
    console.print(table)


@app.command(epilog=examples("llmprune inspect smollm2-135m", "llmprune inspect runs/cfsp20 --json"))
@command()
def inspect(
    model: str = typer.Argument(..., help="a model (Hub id, folder, .gguf, smollm2-135m) or a run folder"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    verbose: bool = opt_verbose(),
) -> None:
    """Show a model's size, dtype, heads, per-layer widths and linear roles, and what llmprune did to a run folder."""
    from pathlib import Path as _Path

    from .describe import model_details
    from .models.loading import load_model

    net, _ = load_model(model, "float32", "cpu")
    desc = model_details(net, model if _Path(model).expanduser().is_dir() else None)
    if as_json:
        console.print_json(json.dumps(desc, default=str))
        return
    console.print(f"[bold]{desc['class']}[/bold] ({desc['model_type']}), {desc['num_layers']} layers at "
                  f"{desc['layers_path']}", highlight=False)
    facts = Table(show_header=False)
    facts.add_row("parameters", f"{desc['params']:,}")
    facts.add_row("dtype", str(desc["dtype"]))
    facts.add_row("attention heads / KV heads", f"{desc['heads']} / {desc['kv_heads']}"
                  + (f" (head dim {desc['head_dim']})" if desc.get("head_dim") else ""))
    facts.add_row("hidden size / vocabulary / context", f"{desc['hidden_size']} / {desc['vocab_size']} / {desc['context']}")
    types = desc["attention_types"]
    facts.add_row("attention types", ", ".join(f"{t} x{types.count(t)}" for t in dict.fromkeys(types)))
    console.print(facts)
    table = Table(title="linears of layer 0")
    table.add_column("name")
    table.add_column("role")
    table.add_column("shape (out, in)")
    for name, role in desc["roles"].items():
        table.add_row(name, role, str(tuple(desc["shapes"][name])))
    console.print(table)
    widths = Table(title="per layer")
    for col in ("layer", "attention", "MLP width", "KV out (k_proj rows)", "params"):
        widths.add_column(col, justify="left" if col == "attention" else "right")
    for layer in desc["per_layer"]:
        kv = next((shape[0] for name, shape in layer["linears"].items() if name.endswith(("k_proj", "qkv_proj"))), None)
        widths.add_row(str(layer["layer"]), str(layer["attention"]), str(layer["mlp_width"]), str(kv),
                       f"{layer['params']:,}")
    console.print(widths)
    record = desc.get("llmprune")
    if record:
        done = Table(title="what llmprune did (llmprune.json)", show_header=False)
        done.add_row("base model", str(record.get("base_model")))
        done.add_row("method", f"{record.get('method')} {json.dumps(record.get('settings'), default=str)}")
        if record.get("calibration"):
            c = record["calibration"]
            done.add_row("calibration", f"{c.get('dataset')}:{c.get('split')} {c.get('nsamples')} x {c.get('seqlen')} "
                         f"seed {c.get('seed')}")
        if "structure" in record:
            st = record["structure"]
            done.add_row("MLP channels removed", f"{st['mlp_channels']['removed_fraction']:.4f}")
            done.add_row("parameters removed", f"{st['params']['removed_fraction']:.4f}")
        elif record.get("sparsity") is not None:
            done.add_row("sparsity (weights of the decoder linears)", f"{record['sparsity']:.4f}")
        if "recovery" in record:
            done.add_row("recovery", json.dumps(record["recovery"], default=str))
        for key in ("eval_dense", "eval"):
            if record.get(key):
                done.add_row("dense ppl" if key == "eval_dense" else "ppl",
                             ", ".join(f"{k} {v}" for k, v in record[key].items()))
        console.print(done)


@app.command(epilog=examples("llmprune methods", "llmprune methods barber"))
@command(models=False)
def methods(
    name: str | None = typer.Argument(None, help="a method to show in full", show_default="all methods"),
) -> None:
    """List the pruning methods, what calibration each needs, and every option with its default."""
    from .describe import method_info
    from .methods import METHODS

    names = [name] if name is not None else METHODS.names()
    infos = [method_info(n) for n in names]  # an unknown name fails here, with suggestions
    if name is None:
        table = Table(title="methods (llmprune methods NAME: every option in full)")
        table.add_column("name")
        table.add_column("kind")
        table.add_column("calibration")
        table.add_column("options (default)")
        table.add_column("summary")
        for info in infos:
            opts = ", ".join(f"{o['name']}={o['default']!r}" for o in info["options"]) or "-"
            table.add_row(info["name"], "structured" if info["structured"] else "weights", info["calibration"],
                          opts, info["summary"])
        console.print(table)
        return
    info = infos[0]
    console.print(f"[bold]{info['name']}[/bold]: {info['summary']}", highlight=False)
    console.print(f"prunes: {'MLP channels (and KV groups), removing them' if info['structured'] else 'weights, zeroing them'}",
                  highlight=False)
    console.print(f"calibration: {info['calibration']}", highlight=False)
    table = Table(title=f"options of {info['name']} (set with --set method.NAME=VALUE)")
    for col in ("option", "type", "default", "description"):
        table.add_column(col, overflow="fold")
    for opt in info["options"]:
        table.add_row(opt["name"], opt["type"], repr(opt["default"]), opt["description"] or "-")
    console.print(table)


@app.command(epilog=examples(
    "llmprune report runs/wanda50 runs/sparsegpt50 --output reports/compare",
    "llmprune report runs/sweep runs/cfsp-eval.json --output reports/all --title 'SmolLM2 at 50%'",
))
@command(models=False)
def report(
    runs: list[str] = typer.Argument(..., metavar="RUN", help="run folders, sweep folders or report JSON files "
                                     "(llmprune eval --json)"),
    output: Path = typer.Option(..., "--output", help="folder to write report.md, report.html and the plots into"),
    title: str | None = typer.Option(None, "--title", help="report title", show_default="from the runs"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    verbose: bool = opt_verbose(),
) -> None:
    """Compare runs side by side: a Markdown and a self-contained HTML report with plots."""
    from .reporting import build_report
    from .reporting.plots import achieved_x

    with console.status("building the report"):
        result = build_report(runs, output, title=title, overwrite=overwrite)
    # The terminal summary: the report's own columns, less the detail that only fits in the files.
    shown = [c for c in result.comparison.columns if c.header in ("run", "method", "settings")
             or (" ppl @" in c.header and " dense ppl @" not in c.header) or c.header.startswith("mean acc")]
    table = Table(title=f"{len(result.runs)} runs compared")
    for col in shown:
        table.add_column(col.header, justify="right" if col.numeric else "left")
    table.add_column("sparsity", justify="right")
    for i, run in enumerate(result.runs):
        x = achieved_x(run)
        sparsity = "—" if x is None else f"{100 * x:.2f}%" + (" of params" if run.structured else "")
        table.add_row(*(col.cells[i] for col in shown), sparsity)
    console.print(table)
    for warning in result.warnings:
        console.print(f"[bold yellow]warning:[/bold yellow] {warning}", highlight=False)
    files = Table(show_header=False)
    for path in result.files:
        files.add_row(path.name, f"{path.stat().st_size / 1024:,.1f} KiB")
    console.print(f"report written to {result.output}:", highlight=False, soft_wrap=True)
    console.print(files)


@app.command(epilog=examples(
    "llmprune recover --model runs/cfsp20 --output runs/cfsp20-lora --steps 100 --data-dir ../shared/data",
    "llmprune recover --model runs/wanda50 --output runs/wanda50-lora --capacity uniform --merge mask",
    "(interrupted? run the same command again: it resumes from the checkpoint in OUTPUT.partial)",
))
@command()
def recover(
    model: str = typer.Option(..., "--model", help="a pruned run folder (llmprune prune --output)"),
    output: str = typer.Option(..., "--output", help="folder to write the recovered model into"),
    steps: int = typer.Option(100, "--steps", help="optimizer steps"),
    seqlen: int = typer.Option(256, "--seqlen", help="training window length in tokens"),
    batch_size: int = typer.Option(4, "--batch-size", help="training windows per step (per process)"),
    lr: float = typer.Option(2e-4, "--lr", help="peak learning rate (warm-up, then cosine decay to 10%)"),
    rank: int = typer.Option(8, "--rank", help="LoRA rank R; importance capacity trains as many parameters as R everywhere"),
    capacity: str = typer.Option("importance", "--capacity", help="importance (IG-LoRA: ranks follow block importance), removed (importance x the share pruning removed from the block), or uniform"),
    importance: str = typer.Option("auto", "--importance", help="auto (saved by CFSP, else measured), saved, computed"),
    power: float = typer.Option(1.0, "--power", help="ranks follow importance ** power (0: uniform)"),
    max_rank: int | None = typer.Option(None, "--max-rank", help="largest rank of a block", show_default="2 x --rank"),
    train_dataset: str = typer.Option("c4", "--train-dataset", help="c4, wikitext2[:split] or a local file"),
    data_dir: str | None = opt_data_dir(),
    eval_: str = typer.Option("wikitext2", "--eval", help="perplexity datasets before/after, comma-separated ('' for none)"),
    eval_seqlen: int = typer.Option(2048, "--eval-seqlen", help="evaluation window length in tokens"),
    eval_windows: int | None = typer.Option(None, "--eval-windows", help="evaluate only the first N windows",
                                        show_default="all"),
    eval_every: int = typer.Option(0, "--eval-every", help="also evaluate every N steps (0: only before and after)"),
    checkpoint_every: int = typer.Option(25, "--checkpoint-every", help="checkpoint every N steps (0: never)"),
    merge: str | None = typer.Option(None, "--merge", help="merge (fold LoRA into the weights), mask (merge and "
                                 "keep the zeros), adapter (save the adapter beside the base)",
                                 show_default="mask for sparse runs, merge otherwise"),
    seed: int = typer.Option(0, "--seed", help="random seed of the data order and LoRA initialization"),
    dtype: str = opt_dtype("float32"),
    device: str = opt_device("auto"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    verbose: bool = opt_verbose(),
) -> None:
    """Recover a pruned model with LoRA (importance-guided ranks by default); resumes an interrupted run."""
    from .recovery import recover as api_recover

    result = api_recover(model, output=output, steps=steps, seqlen=seqlen, batch_size=batch_size, lr=lr, rank=rank,
                         capacity=capacity, importance=importance, power=power, max_rank=max_rank,
                         train_dataset=train_dataset, data_dir=data_dir, eval=eval_, eval_seqlen=eval_seqlen,
                         eval_windows=eval_windows, eval_every=eval_every, checkpoint_every=checkpoint_every,
                         merge=merge, seed=seed, dtype=dtype, device=device, overwrite=overwrite, progress=True)
    if not result.main_process:  # one summary per launch, from the process that wrote the output
        return
    rep, rec = result.report, result.report["recovery"]
    table = Table(title=f"recovery ({rec['capacity']} LoRA) of {rep['model']}")
    for col in ("dataset", "seqlen", "windows", "ppl before", "ppl after"):
        table.add_column(col, justify="left" if col == "dataset" else "right")
    for name, after in (rep.get("eval") or {}).items():
        table.add_row(name, str(after["seqlen"]), f"{after['windows']}/{after['windows_available']}",
                      f"{rep['eval_before'][name]['ppl']:.3f}", f"{after['ppl']:.3f}")
    console.print(table)
    summary = Table(show_header=False)
    summary.add_row("ranks per block", f"{min(rec['ranks'])}..{max(rec['ranks'])} (rank {rec['rank']} uniform budget)")
    summary.add_row("trainable params", f"{rec['trainable_params']:,} (uniform budget {rec['uniform_budget']:,})")
    summary.add_row("steps x batch x seqlen", f"{rec['steps']} x {rec['batch_size']} x {rec['seqlen']}")
    summary.add_row("loss (first -> last 10%)", f"{rec['loss']['mean_first_10pct']:.4f} -> {rec['loss']['mean_last_10pct']:.4f}")
    summary.add_row("merge", rec["merge"]["mode"] + (" (zeros preserved)" if rec["merge"].get("zeros_preserved") else ""))
    if rec["resumed_from_step"]:
        summary.add_row("resumed from step", str(rec["resumed_from_step"]))
    summary.add_row("train time", f"{rep['timings']['train_s']:.1f} s")
    summary.add_row("peak RSS", f"{rep['memory']['peak_rss_mb']:.0f} MB")
    summary.add_row("output", str(result.output))
    console.print(summary)


@app.command(epilog=examples(
    "llmprune export runs/cfsp20 --format gguf --output cfsp20.gguf",
    "llmprune export runs/cfsp20 --output cfsp20-q8.gguf --type q8_0",
))
@command()
def export(
    model: str = typer.Argument(..., help="a run folder, a Hugging Face folder, a .gguf file or a built-in name",
                                show_default=False),
    output: str = typer.Option(..., "--output", "-o", help="the file to write (FILE.gguf)", show_default=False),
    format_: str = typer.Option("gguf", "--format", help="gguf (runs in llama.cpp, Ollama, LM Studio)"),
    type_: str = typer.Option("f16", "--type", help="f32, f16, bf16, or a llama.cpp quantization: q8_0, q4_0, "
                              "q4_k_m, ..."),
    allow_fill: bool = typer.Option(False, "--allow-fill", help="quantize a sparse model with a type that fills in "
                                    "its zeros"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output file"),
    verbose: bool = opt_verbose(),
) -> None:
    """Export a model to GGUF for llama.cpp, with the tokenizer and the per-layer widths (docs/deployment.md)."""
    from .deploy import export as api_export

    result = api_export(model, output, format=format_, type=type_, overwrite=overwrite, allow_fill=allow_fill)
    widths = sorted(set(result.mlp_widths))
    console.print(f"wrote {result.path} ({result.size_bytes / 2**20:.1f} MiB, {result.type}, llama.cpp arch "
                  f"{result.arch}); MLP widths {widths[0]}..{widths[-1]}, KV heads {min(result.kv_heads)}.."
                  f"{max(result.kv_heads)}; tokenizer {result.tokenizer}")
    for note in result.notes:
        console.print(f"note: {note}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
