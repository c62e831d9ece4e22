"""The `prunec` entry point: signals first, then the commands (prunec.cli.app).

Signal handlers are installed before the heavy imports (onnx, onnxruntime, numpy), so that
Ctrl-C or a `kill` in the first second of a run is as clean as one in the middle of it:
temp files removed, one line on stderr, exit 130 (SIGINT), 143 (SIGTERM) or 129 (SIGHUP).
"""

from __future__ import annotations

import signal
import sys

from prunec import interrupts
from prunec.errors import Interrupted


def main() -> None:
    """Console-script entry point."""
    interrupts.install()
    try:
        from prunec.cli.app import run

        code = run(sys.argv[1:])
    except (KeyboardInterrupt, Interrupted) as exc:
        for s in interrupts.SIGNALS:  # a second signal must not interrupt the goodbye
            signal.signal(s, signal.SIG_IGN)
        name = exc.name if isinstance(exc, Interrupted) else "SIGINT"
        print(f"prunec: interrupted ({name}); temp files removed, the run did not finish",
              file=sys.stderr)
        code = interrupts.exit_code(exc)
    sys.exit(code)


def __getattr__(name: str):
    # `from prunec.cli.main import cli` keeps working without importing every command at startup.
    if name == "cli":
        from prunec.cli.app import cli

        return cli
    raise AttributeError(name)
