"""``llmprune`` command line: parses flags into a recipe and calls the API. Nothing else lives here."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from .errors import LLMPruneError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="One-shot pruning of large language models.")
console = Console(stderr=False)
err = Console(stderr=True)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
    raise typer.Exit(2)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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


@app.command()
def prune(
    model: str | None = typer.Option(None, "--model", help="Hub id, local folder, .gguf file or smollm2-135m"),
    method: str | None = typer.Option(None, "--method", help="see `llmprune methods`"),
    sparsity: float | None = typer.Option(None, "--sparsity", help="fraction of weights to remove, in [0, 1)"),
    pattern: str | None = typer.Option(None, "--pattern", help="N:M (keep N of every M), e.g. 2:4"),
    output: str | None = typer.Option(None, "--output", help="folder to write the pruned model into"),
    calib_dataset: str | None = typer.Option(None, "--calib-dataset", help="c4, wikitext2 or a local file"),
    nsamples: int | None = typer.Option(None, "--nsamples", help="calibration windows"),
    seqlen: int | None = typer.Option(None, "--seqlen", help="calibration window length in tokens"),
    seed: int | None = typer.Option(None, "--seed"),
    data_dir: str | None = typer.Option(None, "--data-dir", help="local mirror of the datasets (or LLMPRUNE_DATA_DIR)"),
    eval_: str | None = typer.Option(None, "--eval", help="perplexity datasets, comma-separated: wikitext2,c4"),
    eval_seqlen: int | None = typer.Option(None, "--eval-seqlen"),
    eval_windows: int | None = typer.Option(None, "--eval-windows", help="evaluate only the first N windows"),
    eval_dense: bool | None = typer.Option(None, "--eval-dense/--no-eval-dense", help="also evaluate before pruning"),
    tasks: str | None = typer.Option(None, "--tasks", help="zero-shot lm-eval tasks: paper, offline or names"),
    limit: int | None = typer.Option(None, "--limit", help="zero-shot: first N documents per task"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    recipe: Path | None = typer.Option(None, "--recipe", help="YAML recipe, or a run folder (or its llmprune.json) "
                                       "to re-run; flags and --set override it"),
    set_: list[str] | None = typer.Option(None, "--set", help="override any recipe field: key=value"),
    dtype: str | None = typer.Option(None, "--dtype"),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda:N, or a list cuda:0,cuda:1 (all share the calibration forwards)"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="calibration windows per forward"),
    stream: bool | None = typer.Option(None, "--stream/--no-stream", help="prune one layer at a time from the "
                                       "checkpoint's shards into the output, resumably (default: when it does not fit)"),
    uniform: bool = typer.Option(False, "--uniform", help="structured methods: every layer the same width, so stock "
                                 "from_pretrained loads the output"),
    round_to: int | None = typer.Option(None, "--round-to", help="structured methods: round each layer's kept width "
                                        "to a multiple of N (e.g. 128)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Prune a model and report sparsity, perplexity, time and memory."""
    _setup_logging(verbose)
    from .api import fields_from_kwargs
    from .api import prune as api_prune
    from .recipe import build_recipe, load_recipe_dict, parse_set

    try:
        base = load_recipe_dict(recipe) if recipe else {}
        flags = {
            "model": model, "method": method, "sparsity": sparsity, "pattern": pattern, "output": output,
            "calib_dataset": calib_dataset, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
            "data_dir": data_dir, "eval": eval_, "eval_seqlen": eval_seqlen, "eval_windows": eval_windows,
            "eval_dense": eval_dense, "overwrite": overwrite or None, "dtype": dtype, "device": device,
            "batch_size": batch_size, "tasks": tasks, "limit": limit, "stream": stream,
            "uniform": uniform or None, "round_to": round_to,
        }
        rec = build_recipe(base, fields_from_kwargs(flags), parse_set(set_))
        if recipe:
            from .io.rerun import check_rerun

            check_rerun(recipe, rec)
        result = api_prune(recipe=rec, progress=True)
    except LLMPruneError as exc:
        _fail(exc)
        return
    rep = result.report
    _print_tables(f"{rep['method']} on {rep['model']}", rep)
    summary = Table(show_header=False)
    summary.add_row("sparsity (decoder linears)", f"{rep['sparsity']['overall']:.4f}")
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


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., "--model", help="model name or pruned run folder"),
    tasks: str | None = typer.Option(None, "--tasks", help="zero-shot lm-eval tasks, comma-separated: paper (the "
                                     "seven paper tasks), offline (shipped, no network) or any lm-eval task"),
    eval_: str | None = typer.Option(None, "--eval", help="perplexity datasets: wikitext2,c4 or a file "
                                     "(default: wikitext2 when no --tasks)"),
    eval_seqlen: int = typer.Option(2048, "--eval-seqlen"),
    eval_windows: int | None = typer.Option(None, "--eval-windows"),
    limit: int | None = typer.Option(None, "--limit", help="zero-shot: first N documents per task"),
    num_fewshot: int = typer.Option(0, "--num-fewshot", help="zero-shot: in-context examples (papers: 0)"),
    batch_size: int = typer.Option(8, "--batch-size", help="zero-shot: requests per forward"),
    include_path: str | None = typer.Option(None, "--include-path", help="folder of your own lm-eval task YAMLs"),
    seed: int = typer.Option(0, "--seed"),
    data_dir: str | None = typer.Option(None, "--data-dir"),
    json_out: Path | None = typer.Option(None, "--json", help="write the report to this file"),
    dtype: str = typer.Option("auto", "--dtype"),
    device: str = typer.Option("auto", "--device"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Perplexity and zero-shot accuracy (lm-eval) of a model or a pruned run folder."""
    _setup_logging(verbose)
    from .api import evaluate
    from .io.save import write_json_atomic

    try:
        rep = evaluate(model, datasets=eval_, seqlen=eval_seqlen, windows=eval_windows, tasks=tasks, limit=limit,
                       num_fewshot=num_fewshot, batch_size=batch_size, include_path=include_path, seed=seed,
                       data_dir=data_dir, dtype=dtype, device=device, progress=True)
    except LLMPruneError as exc:
        _fail(exc)
        return
    _print_tables(f"{model}", rep)
    if rep.get("sparsity"):
        console.print(f"sparsity (decoder linears): {rep['sparsity']['overall']:.4f}")
    if json_out:
        write_json_atomic(json_out, rep)
        console.print(f"report written to {json_out}")


@app.command()
def sweep(
    model: str | None = typer.Option(None, "--model", help="Hub id, local folder, .gguf file or smollm2-135m"),
    method: str | None = typer.Option(None, "--method"),
    sparsities: str | None = typer.Option(None, "--sparsities", help="comma-separated sparsities, e.g. 0.3,0.5,0.7"),
    param: str = typer.Option("method.sparsity", "--param", help="the recipe field to sweep (with --values)"),
    values: str | None = typer.Option(None, "--values", help="comma-separated values of --param"),
    output: str | None = typer.Option(None, "--output", help="sweep folder: one run folder per point + sweep.json"),
    pattern: str | None = typer.Option(None, "--pattern"),
    calib_dataset: str | None = typer.Option(None, "--calib-dataset"),
    nsamples: int | None = typer.Option(None, "--nsamples"),
    seqlen: int | None = typer.Option(None, "--seqlen"),
    seed: int | None = typer.Option(None, "--seed"),
    data_dir: str | None = typer.Option(None, "--data-dir"),
    eval_: str | None = typer.Option(None, "--eval", help="perplexity datasets, comma-separated"),
    eval_seqlen: int | None = typer.Option(None, "--eval-seqlen"),
    eval_windows: int | None = typer.Option(None, "--eval-windows"),
    eval_dense: bool | None = typer.Option(None, "--eval-dense/--no-eval-dense"),
    tasks: str | None = typer.Option(None, "--tasks", help="zero-shot lm-eval tasks: paper, offline or names"),
    limit: int | None = typer.Option(None, "--limit", help="zero-shot: first N documents per task"),
    save_models: bool = typer.Option(True, "--save-models/--reports-only", help="write each point's weights"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted sweep with the same settings"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing sweep folder when done"),
    recipe: Path | None = typer.Option(None, "--recipe"),
    set_: list[str] | None = typer.Option(None, "--set", help="override any recipe field: key=value"),
    dtype: str | None = typer.Option(None, "--dtype"),
    device: str | None = typer.Option(None, "--device"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Prune one model at several sparsities (or values of any method field): one run folder per point."""
    _setup_logging(verbose)
    from .api import fields_from_kwargs
    from .recipe import build_recipe, load_recipe_dict, parse_set
    from .sweeps import sweep as api_sweep

    try:
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
        result = api_sweep(recipe=rec, values=sparsities if sparsities is not None else values or "",
                           parameter=param, output=output, overwrite=overwrite, resume=resume,
                           save_models=save_models, progress=True)
    except LLMPruneError as exc:
        _fail(exc)
        return
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


@app.command()
def inspect(
    model: str = typer.Argument(..., help="model name, folder or .gguf"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Show the decoder layers, attention types and linear roles llmprune finds in a model."""
    _setup_logging(False)
    from .models.loading import load_model
    from .models.view import model_view

    try:
        net, _ = load_model(model, "float32", "cpu")
        desc = model_view(net).describe()
    except LLMPruneError as exc:
        _fail(exc)
        return
    if as_json:
        console.print_json(json.dumps(desc))
        return
    console.print(f"[bold]{desc['class']}[/bold] ({desc['model_type']}), {desc['num_layers']} layers at {desc['layers_path']}")
    types = desc["attention_types"]
    assert isinstance(types, list)
    console.print("attention types: " + ", ".join(f"{t} x{types.count(t)}" for t in dict.fromkeys(types)))
    table = Table(title="linears of layer 0")
    table.add_column("name")
    table.add_column("role")
    table.add_column("shape (out, in)")
    roles, shapes = desc["roles"], desc["shapes"]
    assert isinstance(roles, dict) and isinstance(shapes, dict)
    for name, role in roles.items():
        table.add_row(name, role, str(tuple(shapes[name])))
    console.print(table)


@app.command()
def methods() -> None:
    """List the registered methods and their options."""
    from .methods import METHODS

    table = Table(title="methods")
    table.add_column("name")
    table.add_column("calibration")
    table.add_column("options (default)")
    table.add_column("summary")
    for name in METHODS.names():
        cls = METHODS.get(name)
        opts = ", ".join(f"{k}={f.default!r}" for k, f in cls.Options.model_fields.items()) or "-"
        table.add_row(name, cls.stats or "none", opts, cls.summary)
    console.print(table)


@app.command()
def report(
    runs: list[str] = typer.Argument(..., metavar="RUN", help="run folders, sweep folders or report JSON files (llmprune eval --json)"),
    output: Path = typer.Option(..., "--output", help="folder to write report.md, report.html and the plots into"),
    title: str | None = typer.Option(None, "--title", help="report title"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
) -> None:
    """Compare runs side by side: a Markdown and a self-contained HTML report with plots."""
    _setup_logging(False)
    from .reporting import build_report
    from .reporting.plots import achieved_x

    try:
        with console.status("building the report"):
            result = build_report(runs, output, title=title, overwrite=overwrite)
    except LLMPruneError as exc:
        _fail(exc)
        return
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


@app.command()
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
    max_rank: int | None = typer.Option(None, "--max-rank", help="largest rank of a block (default 2 x --rank)"),
    train_dataset: str = typer.Option("c4", "--train-dataset", help="c4, wikitext2[:split] or a local file"),
    data_dir: str | None = typer.Option(None, "--data-dir", help="local mirror of the datasets (or LLMPRUNE_DATA_DIR)"),
    eval_: str = typer.Option("wikitext2", "--eval", help="perplexity datasets before/after, comma-separated ('' for none)"),
    eval_seqlen: int = typer.Option(2048, "--eval-seqlen"),
    eval_windows: int | None = typer.Option(None, "--eval-windows", help="evaluate only the first N windows"),
    eval_every: int = typer.Option(0, "--eval-every", help="also evaluate every N steps (0: only before and after)"),
    checkpoint_every: int = typer.Option(25, "--checkpoint-every", help="checkpoint every N steps (0: never)"),
    merge: str | None = typer.Option(None, "--merge", help="merge (structured/dense default), mask (sparse default), adapter"),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = typer.Option("float32", "--dtype"),
    device: str = typer.Option("auto", "--device"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Recover a pruned model with LoRA (importance-guided ranks by default); resumes an interrupted run."""
    _setup_logging(verbose)
    from .recovery import recover as api_recover

    try:
        result = api_recover(model, output=output, steps=steps, seqlen=seqlen, batch_size=batch_size, lr=lr, rank=rank,
                             capacity=capacity, importance=importance, power=power, max_rank=max_rank,
                             train_dataset=train_dataset, data_dir=data_dir, eval=eval_, eval_seqlen=eval_seqlen,
                             eval_windows=eval_windows, eval_every=eval_every, checkpoint_every=checkpoint_every,
                             merge=merge, seed=seed, dtype=dtype, device=device, overwrite=overwrite, progress=True)
    except LLMPruneError as exc:
        _fail(exc)
        return
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


@app.command()
def export(
    model: str = typer.Argument(..., help="a run folder, a Hugging Face folder, a .gguf file or a built-in name"),
    output: str = typer.Option(..., "--output", "-o", help="the file to write (FILE.gguf)"),
    format_: str = typer.Option("gguf", "--format", help="gguf (runs in llama.cpp, Ollama, LM Studio)"),
    type_: str = typer.Option("f16", "--type", help="f32, f16, bf16, or a llama.cpp quantization: q8_0, q4_0, q4_k_m, ..."),
    allow_fill: bool = typer.Option(False, "--allow-fill", help="quantize a sparse model with a type that fills in its zeros"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output file"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Export a model to GGUF for llama.cpp, with the tokenizer and the per-layer widths (docs/deployment.md)."""
    _setup_logging(verbose)
    from .export import export as api_export

    try:
        result = api_export(model, output, format=format_, type=type_, overwrite=overwrite, allow_fill=allow_fill)
    except LLMPruneError as exc:
        _fail(exc)
        return
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
