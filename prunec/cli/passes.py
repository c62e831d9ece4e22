"""`prunec passes`: list passes and their options."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from prunec.passes import registry
from prunec.passes.base import option_infos


@click.command("passes")
def command() -> None:
    """List the available passes and their options (set with -O pass.key=value)."""
    console = Console()
    for name, cls in registry().items():
        kind = "exact" if cls.exact else "lossy"
        console.print(f"[bold]{name}[/bold] ({kind}): {cls.summary}")
        infos = option_infos(cls.Options)
        if infos:
            t = Table(show_header=True, box=None, padding=(0, 2))
            for col in ("option", "type", "default", "help"):
                t.add_column(col)
            for o in infos:
                t.add_row(f"{name}.{o.name}", o.type_name, repr(o.default), o.help)
            console.print(t)
        console.print()
