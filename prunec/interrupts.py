"""SIGINT, SIGTERM and SIGHUP as exceptions, so that every temp file is removed on the way out.

`install()` (called once by the `prunec` command) makes SIGTERM and SIGHUP raise `Interrupted`
and SIGINT raise KeyboardInterrupt, wherever the main thread is; cleanup code (`finally`,
`except BaseException`) then runs as for any exception. `deferred()` holds a signal for the few
statements where a temp file exists but is not yet recorded for cleanup, or is being renamed
into place, and raises it right after.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

from prunec.errors import Interrupted

#: The signals a build pipeline sends to stop a step: Ctrl-C, `kill`, a closed terminal.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_pending: list[int] = []
_depth = 0


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signum, signal.Signals(signum).name)


def _handler(signum: int, frame) -> None:
    if _depth:
        _pending.append(signum)
        return
    _raise(signum)


def install() -> None:
    """Route SIGINT, SIGTERM and SIGHUP to exceptions (main thread only). A signal ignored by
    whoever started prunec stays ignored (`nohup` ignores SIGHUP; shells ignore SIGINT in
    background jobs)."""
    for s in SIGNALS:
        if signal.getsignal(s) != signal.SIG_IGN:
            signal.signal(s, _handler)


@contextmanager
def deferred():
    """Hold SIGINT/SIGTERM/SIGHUP during a short critical section; raise the first one after it."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending:
            signum = _pending[0]
            _pending.clear()
            _raise(signum)


def exit_code(exc: BaseException) -> int:
    """The shell's exit status for a process stopped by this signal exception (130 for SIGINT)."""
    return exc.exit_code if isinstance(exc, Interrupted) else 128 + signal.SIGINT
