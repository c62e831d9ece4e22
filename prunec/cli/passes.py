"""`prunec passes`: list passes and their options."""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding

from prunec.passes import registry
from prunec.passes.base import option_infos


@click.command("passes")
def command() -> None:
    """List the available passes and their options (set with -O pass.key=value)."""
    console = Console()
    for name, cls in registry().items():
        kind = "exact" if cls.exact else "lossy"
        console.print(f"[bold]{name}[/bold] ({kind}): {escape(cls.summary)}")
        for o in option_infos(cls.Options):
            # One option per entry with its help below: stays readable in an 80-column terminal.
            default = o.default if isinstance(o.default, str) else repr(o.default)
            console.print(f"  [cyan]-O {name}.{o.name}[/cyan]={escape(default)}  "
                          f"[dim]{escape(o.type_name)}[/dim]", highlight=False)
            console.print(Padding(escape(o.help), (0, 0, 0, 6)))
        console.print()
