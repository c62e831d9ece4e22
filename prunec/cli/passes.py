"""`prunec passes`: list passes and their options."""

from __future__ import annotations

import json

import click
from rich.markup import escape
from rich.padding import Padding

from prunec.cli.options import json_option
from prunec.passes import registry
from prunec.passes.base import option_infos
from prunec.report.console import console as make_console
from prunec.report.files import check_output_file, write_text_atomic


def passes_doc() -> dict:
    """Every pass with its kind, summary and options (name, type, default, help), JSON-ready."""
    doc = []
    for name, cls in registry().items():
        options = [{"flag": f"-O {name}.{o.name}", "name": o.name, "type": o.type_name,
                    "default": o.default if isinstance(o.default, (str, int, float, bool, type(None)))
                    else repr(o.default), "help": o.help} for o in option_infos(cls.Options)]
        doc.append({"name": name, "kind": "exact" if cls.exact else "lossy", "summary": cls.summary,
                    "options": options})
    return {"passes": doc}


@click.command("passes")
@json_option("Write the passes and their options as JSON here.", stdout=True)
def command(json_path: str | None) -> None:
    """List the available passes and their options (set with -O pass.key=value)."""
    if json_path:
        text = json.dumps(passes_doc(), indent=2)
        if json_path == "-":
            click.echo(text)
            return
        check_output_file(json_path, "--json")
        write_text_atomic(json_path, text, f"--json {json_path}")
    console = make_console()
    for name, cls in registry().items():
        kind = "exact" if cls.exact else "lossy"
        console.print(f"[bold]{name}[/bold] ({kind}): {escape(cls.summary)}")
        for o in option_infos(cls.Options):
            # One option per entry with its help below: stays readable in an 80-column terminal.
            default = o.default if isinstance(o.default, str) else repr(o.default)
            console.print(f"  [cyan]-O {name}.{o.name}[/cyan]={escape(default)}  "
                          f"[dim]{escape(o.type_name)}[/dim]", highlight=False)
            console.print(Padding(escape(o.help), (0, 0, 0, 6), expand=False))
        console.print()
