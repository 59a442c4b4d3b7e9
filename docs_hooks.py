"""MkDocs hooks: the CLI reference page is generated from the typer app when the site is built, so
every command, flag and default it lists is what ``llmprune`` accepts (never typed by hand).

mkdocs-click cannot read typer >= 0.2x commands (typer vendors its own click), so this hook walks
the click objects typer builds and writes the Markdown itself.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

MARKER = "<!-- cli-reference -->"


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _kind(param: Any, ctx: Any) -> str:
    try:
        return _cell(param.display_type(ctx)).strip("<>")
    except Exception:  # noqa: BLE001  (an older typer: fall back to click's type name)
        return _cell(getattr(getattr(param, "type", None), "name", ""))


def _default(param: Any) -> str:
    value = param.default
    if value is None or value == () or getattr(param, "is_flag", False) and value is False:
        return ""
    if callable(value):
        return "(computed)"
    return f"`{value}`"


def cli_markdown() -> str:
    """One section per subcommand: its help, usage, arguments and options with types and defaults."""
    import typer

    from llmprune.cli import app

    group = typer.main.get_command(app)
    ctx = group.make_context("llmprune", [], resilient_parsing=True)
    out = [f"`llmprune`: {_cell(group.help or '')} Defaults left blank come from the recipe "
           "(see each flag's text and `llmprune methods`).", ""]
    out += ["| command | what it does |", "|---|---|"]
    out += [f"| [`{name}`](#{name}) | {_cell((cmd.help or '').splitlines()[0])} |"
            for name, cmd in sorted(group.commands.items())]
    for name, cmd in sorted(group.commands.items()):
        sub = cmd.make_context(name, [], parent=ctx, resilient_parsing=True)
        pieces = " ".join(cmd.collect_usage_pieces(sub))
        out += ["", f"## {name}", "", (cmd.help or "").strip(), "", "```text", f"llmprune {name} {pieces}", "```", ""]
        args = [p for p in cmd.params if p.param_type_name == "argument"]
        opts = [p for p in cmd.params if p.param_type_name == "option" and not getattr(p, "hidden", False)]
        if args:
            out += ["| argument | type | meaning |", "|---|---|---|"]
            out += [f"| `{(p.metavar or p.name).upper()}` | {_kind(p, sub)} | {_cell(getattr(p, 'help', '') or '')} |"
                    for p in args]
            out.append("")
        if opts:
            out += ["| option | type | default | meaning |", "|---|---|---|---|"]
            for p in opts:
                names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
                kind = "flag" if getattr(p, "is_flag", False) else _kind(p, sub)
                out.append(f"| {names} | {kind} | {_default(p)} | {_cell(p.help or '')} |")
    return "\n".join(out) + "\n"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_markdown())
    return markdown
