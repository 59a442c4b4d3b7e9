"""The comparison table (one row per run) and its rendering as Markdown and HTML.

Evaluation settings rule: a number is only put in a column with numbers taken under the same
evaluation settings.

- Perplexity columns (``eval``, and ``eval_dense`` before pruning) are keyed by (dataset, seqlen,
  windows), and every header names its setting (``wikitext2 ppl @2048 x16``). A dataset measured
  under several settings gets one column per setting, and the report carries a warning naming the
  runs under each setting.
- Zero-shot task columns (``zeroshot``, and ``zeroshot_dense`` before pruning) are keyed by (task,
  task version, num_fewshot, limit, lm-eval version); the mean is also keyed by the tasks (with
  versions) it averages. When runs differ in any of these, the columns are split, their headers
  name the differing setting, and the report carries a warning.
- Runs of different models are allowed in one table, with a warning naming the models and runs.

The warnings appear at the top of both the Markdown and the HTML report (and in the CLI output).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LLMPruneError
from .load import Run

DASH = "—"
# Options always shown for these methods, defaults or not; other options only when not the default.
KEY_OPTIONS = {"barber": ("init", "ratio", "granularity"), "cfsp": ("importance", "score")}


@dataclass
class Column:
    header: str
    cells: list[str]
    numeric: bool = False


@dataclass
class Comparison:
    """What the report shows about its runs: the table, warnings and the evaluation settings."""

    runs: list[Run]
    columns: list[Column]
    warnings: list[str] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)  # one line per evaluation setting, with its runs


# --- describing one run ---------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _requested(x: float) -> str:
    return f"{100 * x:.4g}%"


def _default_options(method: str) -> dict[str, Any]:
    from ..methods import METHODS

    try:
        return METHODS.get(method).Options().model_dump(mode="json")
    except LLMPruneError:  # a method this version does not know: every option is shown
        return {}


def method_settings(run: Run) -> tuple[str, list[str]]:
    """(pattern and requested sparsity, ``key=value`` options worth showing) of a prune run."""
    spec = dict(run.report.get("recipe", {}).get("method", {}))
    if not spec:
        return DASH, []
    sparsity, pattern = spec.pop("sparsity", None), spec.pop("pattern", "unstructured")
    spec.pop("name", None)
    if pattern == "channels":
        target = spec.pop("target", "mlp")
        head = f"channels {_requested(sparsity)} of {'MLP channels' if target == 'mlp' else 'params'}"
    elif pattern == "unstructured":
        head = f"unstructured {_requested(sparsity)}" if sparsity is not None else "unstructured"
    else:
        head = str(pattern)
    defaults = _default_options(run.method)
    keys = [k for k in KEY_OPTIONS.get(run.method, ()) if k in spec]
    keys += [k for k in spec if k not in keys and (k not in defaults or defaults[k] != spec[k])]
    return head, [f"{k}={spec[k]}" for k in keys]


def group_label(run: Run) -> str:
    """Runs that differ only in how much they prune share a group (a line in perplexity-vs-sparsity)."""
    if run.is_eval:
        return "eval"
    head, options = method_settings(run)
    parts = [run.method]
    if ":" in head:
        parts.append(head)
    target = run.report.get("recipe", {}).get("method", {}).get("target")
    if run.structured and target not in (None, "mlp"):
        parts.append(f"target={target}")
    return " ".join(parts + options)


def calibration_text(run: Run) -> str:
    if run.is_eval:
        return DASH
    cal = run.report.get("calibration")
    if not cal:
        return "none (data-free)"
    if cal.get("dataset") == "file" and cal.get("file"):
        name = Path(cal["file"]).name
    else:
        name = str(cal.get("dataset", "?")) + (f":{cal['split']}" if cal.get("split") not in (None, "all") else "")
        if cal.get("documents"):
            name += f" docs {cal['documents'][0]}:{cal['documents'][1]}"
    return f"{name} {cal.get('nsamples')}x{cal.get('seqlen')} seed {cal.get('seed')}"


def sparsity_text(run: Run) -> str:
    sp = run.report.get("sparsity") or {}
    if "overall" not in sp:
        return DASH
    text = f"{_pct(sp['overall'])} zeros"
    if "nm_valid" in sp:
        text += f" ({sp['pattern']} {'valid' if sp['nm_valid'] else 'INVALID'})"
    if run.structured:
        text += f"; {_pct(run.report['structure']['mlp_channels']['removed_fraction'])} of MLP channels removed"
    return text


def params_text(run: Run) -> str:
    if run.structured:
        p = run.report["structure"]["params"]
        return f"{p['dense']:,} → {p['pruned']:,} (−{_pct(p['removed_fraction'])})"
    total = (run.report.get("params") or {}).get("total")
    return f"{total:,}" if total is not None else DASH


def _rss(mb: float | None) -> str:
    return DASH if mb is None else f"{mb:,.0f} MB"


def _seconds(value: float | None) -> str:
    return DASH if value is None else f"{value:,.1f} s"


# --- evaluation settings ----------------------------------------------------------------------------

PplSetting = tuple[str, int, int]  # dataset, seqlen, windows


def ppl_setting(dataset: str, result: dict[str, Any]) -> PplSetting:
    return dataset, int(result["seqlen"]), int(result["windows"])


def ppl_header(setting: PplSetting, dense: bool = False) -> str:
    dataset, seqlen, windows = setting
    return f"{dataset} {'dense ' if dense else ''}ppl @{seqlen} x{windows}"


def ppl_settings(runs: list[Run]) -> dict[PplSetting, list[Run]]:
    """Every perplexity setting (pruned or dense) in order of appearance, with the runs measured under it."""
    out: dict[PplSetting, list[Run]] = {}
    for run in runs:
        for key in ("eval", "eval_dense"):
            for dataset, res in (run.report.get(key) or {}).items():
                members = out.setdefault(ppl_setting(dataset, res), [])
                if run not in members:
                    members.append(run)
    return out


ZsSetting = tuple[int, Any, str]  # num_fewshot, limit, lm-eval version


def zs_setting(zs: dict[str, Any]) -> ZsSetting:
    settings = zs.get("settings", {})
    return settings.get("num_fewshot", 0), settings.get("limit"), str(zs.get("versions", {}).get("lm_eval", "?"))


def zs_label(setting: ZsSetting) -> str:
    shots, limit, version = setting
    return f"{shots}-shot" + (f", limit {limit}" if limit is not None else "") + f", lm-eval {version}"


MeanKey = tuple[ZsSetting, tuple[str, ...]]  # a zero-shot setting and the tasks (with versions) a mean averages
ZS_KEYS = ("zeroshot_dense", "zeroshot")  # zero-shot results before and after pruning (same shape)


def mean_key(zs: dict[str, Any]) -> MeanKey:
    """What a mean accuracy is comparable by: the setting and the tasks (with versions) it averages."""
    return zs_setting(zs), tuple(sorted(f"{task} v{res.get('version')}" for task, res in zs.get("tasks", {}).items()))


def zeroshot_means(runs: list[Run], key: str = "zeroshot") -> dict[MeanKey, list[Run]]:
    """Runs with zero-shot results (``key``) grouped so that their mean accuracies are comparable."""
    out: dict[MeanKey, list[Run]] = {}
    for run in runs:
        if run.report.get(key):
            out.setdefault(mean_key(run.report[key]), []).append(run)
    return out


def _add(groups: dict[Any, list[Run]], key: Any, run: Run) -> None:
    members = groups.setdefault(key, [])
    if run not in members:
        members.append(run)


def _names(runs: list[Run]) -> str:
    return ", ".join(r.label for r in runs)


def _split_warning(what: str, groups: dict[str, list[Run]]) -> str:
    parts = "; ".join(f"{setting} ({_names(members)})" for setting, members in groups.items())
    return (f"{what} was measured under {len(groups)} different settings: {parts}. Each setting has its own "
            f"column(s); numbers in different columns are not comparable.")


def _grouped(keys: list[Any]) -> list[Any]:
    """Keys whose first element is a name (dataset, task), reordered so that one name's keys are adjacent."""
    first: dict[Any, int] = {}
    for key in keys:
        first.setdefault(key[0], len(first))
    return sorted(keys, key=lambda k: first[k[0]])  # stable: each name's keys keep their order


def _keyed_columns(runs: list[Run], keys: list[Any], header: Callable[[Any], str],
                   cell: Callable[[Run, Any], str | None]) -> list[Column]:
    columns = []
    for key in keys:
        cells = [cell(run, key) for run in runs]
        if any(c is not None for c in cells):
            columns.append(Column(header(key), [DASH if c is None else c for c in cells], numeric=True))
    return columns


def _ppl_columns(runs: list[Run], warnings: list[str], settings: list[str]) -> list[Column]:
    by_setting = ppl_settings(runs)
    by_dataset: dict[str, dict[str, list[Run]]] = {}
    for setting, members in by_setting.items():
        by_dataset.setdefault(setting[0], {})[f"seqlen {setting[1]} x {setting[2]} windows"] = members
        settings.append(f"{ppl_header(setting)}: perplexity on {setting[0]}, windows of {setting[1]} tokens, "
                        f"first {setting[2]} windows ({_names(members)})")
    for dataset, groups in by_dataset.items():
        if len(groups) > 1:
            warnings.append(_split_warning(f"{dataset} perplexity", groups))

    def cell(key: str) -> Callable[[Run, Any], str | None]:
        def get(run: Run, setting: Any) -> str | None:
            res = (run.report.get(key) or {}).get(setting[0])
            return f"{res['ppl']:.3f}" if res and ppl_setting(setting[0], res) == setting else None
        return get

    columns = []
    for setting in _grouped(list(by_setting)):
        columns += _keyed_columns(runs, [setting], lambda s: ppl_header(s, dense=True), cell("eval_dense"))
        columns += _keyed_columns(runs, [setting], ppl_header, cell("eval"))
    return columns


def _acc(result: dict[str, Any]) -> str:
    text = f"{result['acc']:.4f}"
    return text + (f" (norm {result['acc_norm']:.4f})" if result.get("acc_norm") is not None else "")


def _zeroshot_columns(runs: list[Run], warnings: list[str], settings: list[str]) -> list[Column]:
    entries = [(run, run.report[key]) for run in runs for key in ZS_KEYS if run.report.get(key)]
    if not entries:
        return []
    by_setting: dict[ZsSetting, list[Run]] = {}
    tasks: dict[tuple[str, str, ZsSetting], list[Run]] = {}
    means: dict[MeanKey, list[Run]] = {}
    for run, zs in entries:
        setting = zs_setting(zs)
        _add(by_setting, setting, run)
        for task, res in zs.get("tasks", {}).items():
            _add(tasks, (task, str(res.get("version")), setting), run)
        _add(means, mean_key(zs), run)
    many_settings = len(by_setting) > 1
    if many_settings:
        warnings.append(_split_warning("zero-shot accuracy", {zs_label(s): m for s, m in by_setting.items()}))
    for setting, members in by_setting.items():
        settings.append(f"zero-shot{f' [{zs_label(setting)}]' if many_settings else ''}: {zs_label(setting)} "
                        f"({_names(members)})")
    versions: dict[tuple[str, ZsSetting], dict[str, list[Run]]] = {}
    for (task, version, setting), members in tasks.items():
        versions.setdefault((task, setting), {})[f"version {version}"] = members
    for (task, _), groups in versions.items():
        if len(groups) > 1:
            warnings.append(_split_warning(f"zero-shot task {task}", groups))
    task_sets: dict[ZsSetting, dict[str, list[Run]]] = {}
    for (setting, names), members in means.items():
        task_sets.setdefault(setting, {})[", ".join(names)] = members
    for groups in task_sets.values():
        if len(groups) > 1:
            warnings.append("mean zero-shot accuracy averages different tasks or task versions: "
                            + "; ".join(f"{names} ({_names(m)})" for names, m in groups.items())
                            + ". Each task set has its own mean column.")

    def suffix(setting: ZsSetting) -> str:
        return f" [{zs_label(setting)}]" if many_settings else ""

    def task_header(dense: bool) -> Callable[[Any], str]:
        def header(key: Any) -> str:
            task, version, setting = key
            split_version = len(versions[(task, setting)]) > 1
            return f"{task} {'dense ' if dense else ''}acc{f' (v{version})' if split_version else ''}{suffix(setting)}"
        return header

    def task_cell(which: str) -> Callable[[Run, Any], str | None]:
        def cell(run: Run, key: Any) -> str | None:
            task, version, setting = key
            zs = run.report.get(which)
            res = zs.get("tasks", {}).get(task) if zs and zs_setting(zs) == setting else None
            return _acc(res) if res and str(res.get("version")) == version else None
        return cell

    def mean_header(dense: bool) -> Callable[[Any], str]:
        def header(key: Any) -> str:
            setting, names = key
            split_tasks = len(task_sets[setting]) > 1
            listed = f" ({len(names)} tasks: {', '.join(names)})" if split_tasks else ""
            return f"mean {'dense ' if dense else ''}acc{listed}{suffix(setting)}"
        return header

    def mean_cell(which: str) -> Callable[[Run, Any], str | None]:
        def cell(run: Run, key: Any) -> str | None:
            zs = run.report.get(which)
            return _acc(zs["mean"]) if zs and mean_key(zs) == key and zs.get("mean", {}).get("acc") is not None else None
        return cell

    columns = []
    for key in _grouped(list(tasks)):
        columns += _keyed_columns(runs, [key], task_header(True), task_cell("zeroshot_dense"))
        columns += _keyed_columns(runs, [key], task_header(False), task_cell("zeroshot"))
    for key in means:
        columns += _keyed_columns(runs, [key], mean_header(True), mean_cell("zeroshot_dense"))
        columns += _keyed_columns(runs, [key], mean_header(False), mean_cell("zeroshot"))
    return columns


def compare(runs: list[Run]) -> Comparison:
    """The comparison table of ``runs`` (one row each) with its warnings and evaluation settings."""
    warnings: list[str] = []
    settings: list[str] = []
    models: dict[str, list[Run]] = {}
    for run in runs:
        models.setdefault(str(run.report["model"]), []).append(run)
    if len(models) > 1:
        warnings.append("runs differ in model: " + "; ".join(f"{m} ({_names(r)})" for m, r in models.items())
                        + ". Their differences are not due to pruning alone.")

    def col(header: str, get: Callable[[Run], str], numeric: bool = False) -> Column:
        return Column(header, [get(r) for r in runs], numeric)

    def settings_cell(run: Run) -> str:
        head, options = method_settings(run)
        return " ".join([head, *options])

    def timing(key: str) -> Callable[[Run], str]:
        return lambda r: _seconds((r.report.get("timings") or {}).get(key))

    columns = [
        col("run", lambda r: r.label),
        col("model", lambda r: str(r.report["model"])),
        col("method", lambda r: r.method),
        col("settings", settings_cell),
        col("calibration", calibration_text),
        *_ppl_columns(runs, warnings, settings),
        *_zeroshot_columns(runs, warnings, settings),
        col("sparsity (decoder linears)", sparsity_text, numeric=True),
        col("parameters", params_text, numeric=True),
        col("prune time", timing("prune_s"), numeric=True),
        col("total time", timing("total_s"), numeric=True),
        col("peak RSS", lambda r: _rss((r.report.get("memory") or {}).get("peak_rss_mb")), numeric=True),
        col("device", lambda r: str(r.report.get("device", DASH))),
    ]
    return Comparison(runs, columns, warnings, settings)


# --- rendering ----------------------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: list[Column]) -> str:
    lines = ["| " + " | ".join(_md_cell(c.header) for c in columns) + " |",
             "|" + "|".join("---:" if c.numeric else "---" for c in columns) + "|"]
    for i in range(len(columns[0].cells)):
        lines.append("| " + " | ".join(_md_cell(c.cells[i]) for c in columns) + " |")
    return "\n".join(lines)


def html_table(columns: list[Column]) -> str:
    def td(tag: str, col: Column, text: str) -> str:
        cls = ' class="num"' if col.numeric else ""
        return f"<{tag}{cls}>{html.escape(text)}</{tag}>"

    head = "<tr>" + "".join(td("th", c, c.header) for c in columns) + "</tr>"
    body = "\n".join("<tr>" + "".join(td("td", c, c.cells[i]) for c in columns) + "</tr>"
                     for i in range(len(columns[0].cells)))
    return f"<table>\n<thead>{head}</thead>\n<tbody>\n{body}\n</tbody>\n</table>"
