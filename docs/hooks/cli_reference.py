"""mkdocs hook: the CLI reference, generated from the typer app at every build.

``cli.md`` holds the marker ``<!-- cli-reference -->``; this hook replaces it with every command
of ``jregfix.cli.app`` (sub-commands included, in the order ``--help`` lists them): its help
text, usage line and a table of its arguments and options with their metavar, help, default and
whether they are required, exactly as the command's own ``--help`` words them. Nothing is
written by hand, so the page cannot drift from the code.
"""

from __future__ import annotations

import html
import re

MARKER = "<!-- cli-reference -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "cli.md":
        return markdown
    if MARKER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"cli.md lost its {MARKER} marker: the CLI reference has no place")
    return markdown.replace(MARKER, cli_reference())


def cli_reference() -> str:
    """Markdown for every command of the jregfix CLI."""
    import typer.main

    from jregfix.cli import app

    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="jregfix")
    return "\n".join(_command(root, ctx, level=2))


def _command(command, ctx, level: int) -> list[str]:
    path = ctx.command_path
    out = [f"{'#' * level} `{path}`", ""]
    if command.help:
        out += [_clean(command.help), ""]
    out += ["```text", command.get_usage(ctx), "```", ""]
    rows = [
        record
        for param in command.get_params(ctx)
        if (record := param.get_help_record(ctx)) is not None
    ]
    if rows:
        out += ["| argument / option | meaning |", "|---|---|"]
        out += [f"| `{decl}` | {_cell(help_text)} |" for decl, help_text in rows]
        out.append("")
    for name in getattr(command, "list_commands", lambda _: [])(ctx):
        sub = command.get_command(ctx, name)
        if sub is None or sub.hidden:
            continue
        out += _command(sub, sub.context_class(sub, info_name=name, parent=ctx), level + 1)
    return out


def _clean(text: str) -> str:
    """Help text as markdown: typer's paragraph breaks kept, hard wraps joined, no raw HTML."""
    paragraphs = re.split(r"\n\s*\n", text.strip())
    return "\n\n".join(html.escape(" ".join(p.split()), quote=False) for p in paragraphs)


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped, ``[default: x]``/``[required]`` set apart."""
    text = _clean(text).replace("\n\n", " ").replace("|", r"\|")
    return re.sub(r"\s*\[(default: [^\]]*|required)\]", r" *[\1]*", text)
