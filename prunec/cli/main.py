"""The `prunec` command. Commands live in sibling modules; this maps user errors to exit codes."""

from __future__ import annotations

import sys

import click

from prunec import __version__
from prunec.errors import PrunecError


class UserError(click.ClickException):
    """A PrunecError shown as one line, with the error's own exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"prunec: error: {self.format_message()}", err=True)


class PrunecGroup(click.Group):
    """Turns PrunecError into a one-line message and its exit code; bugs keep their traceback."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Keep the command line as given, so the closing PASSED/FAILED line can repeat it
        # (sys.argv is someone else's when prunec runs in-process, e.g. under CliRunner).
        ctx.meta["prunec.argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PrunecError as exc:
            if ctx.meta.get("prunec.debug"):
                # The one line hides where it came from (an ONNX Runtime message, a checker
                # report); for a bug report, show it all.
                import traceback

                traceback.print_exception(exc, file=sys.stderr)
            raise UserError(str(exc), exc.exit_code) from exc


@click.group(cls=PrunecGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                  "max_content_width": 100})
@click.version_option(__version__, prog_name="prunec")
@click.option("--debug", is_flag=True,
              help="On an error, also print its traceback and full cause (a bug in prunec always "
                   "shows its traceback).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Make exported ONNX models smaller and faster, and prove every step."""
    ctx.meta["prunec.debug"] = debug


def _register() -> None:
    from prunec.cli import diff as diff_cmd
    from prunec.cli import inspect as inspect_cmd
    from prunec.cli import passes as passes_cmd
    from prunec.cli import check as check_cmd
    from prunec.cli import potential as potential_cmd
    from prunec.cli import profile as profile_cmd
    from prunec.cli import sensitivity as sensitivity_cmd
    from prunec.cli import run as run_cmd

    for mod in (run_cmd, passes_cmd, inspect_cmd, diff_cmd, check_cmd, sensitivity_cmd, potential_cmd,
                profile_cmd):
        cli.add_command(mod.command)


_register()


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(prog_name="prunec")
    except KeyboardInterrupt:
        click.echo("prunec: interrupted", err=True)
        sys.exit(130)
