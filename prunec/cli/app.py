"""The `prunec` command group. Commands live in sibling modules; this maps user errors to exit codes."""

from __future__ import annotations

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
                import sys
                import traceback

                traceback.print_exception(exc, file=sys.stderr)
            raise UserError(str(exc), exc.exit_code) from exc


#: Shown at the end of `prunec --help`; README lists the same.
EXIT_CODES = """\b
Exit codes:
  0    success
  1    a bug in prunec (with a traceback; please report it)
  2    bad input: options, model, data, or an output path that cannot be written
  3    accuracy gate failed (check, run --data), a --min-cosine/--max-deviation fidelity gate
       failed (run), or a --budget plan predicts more than --max-drop
  4    a rewritten model failed verification
  5    breaking interface change (diff --fail-on-breaking)
  129, 130, 143  interrupted by SIGHUP, SIGINT (Ctrl-C), SIGTERM; temp files are removed"""


@click.group(cls=PrunecGroup, epilog=EXIT_CODES,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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


def run(args: list[str]) -> int:
    """Run the command line `args`; return the exit code (signals propagate to the caller)."""
    try:
        rv = cli.main(args, prog_name="prunec", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):
            raise exc.__cause__ from None
        click.echo("prunec: aborted", err=True)
        return 1
    return rv if isinstance(rv, int) else 0
