"""Where output goes: a terminal gets rich's tables and progress bars; a pipe or a CI log gets
tables at their full width (no name is cut or wrapped) and progress as plain lines.

Long commands (sensitivity, potential, profile, run with a gate) take a `progress` callback:
a rich bar on a terminal, `ProgressLines` otherwise. Plain lines go to stderr one interval
(PRUNEC_PROGRESS_SECONDS, default 5 s) after the previous one, so a quick command prints none;
when a single step runs longer than two intervals, a line says the command is still at work.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from rich.console import Console

#: Wide enough that no table or line is ever wrapped: a log can be read with `less -S`.
FULL_WIDTH = 100_000


def console(stderr: bool = False) -> Console:
    """A rich Console: the terminal's own, else one that never wraps or cuts (tables at full width)."""
    c = Console(stderr=stderr)
    return c if c.is_terminal else Console(stderr=stderr, width=FULL_WIDTH)


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("PRUNEC_PROGRESS_SECONDS", "5")))
    except ValueError:
        return 5.0


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLines:
    """Plain progress lines on stderr for logs: `what: 12/40 (30%), 0:42 elapsed, ~1:38 left: label`.

    Call it as `progress(done, total, label)` (steps) or `progress.update(label, fraction)`;
    `progress.phase(text)` says what starts now. Use it as a context manager (the heartbeat)."""

    def __init__(self, what: str, *, interval: float | None = None, stream=None):
        self.what = what
        self.interval = _interval() if interval is None else interval
        self.stream = stream
        self.start = time.monotonic()
        self.last_print = self.start  # quiet start: nothing for commands quicker than one interval
        self.step: tuple[int, int] | None = None
        self.label = "starting"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _emit(self, text: str) -> None:
        with self._lock:
            print(f"{self.what}: {text}", file=self.stream or sys.stderr, flush=True)
            self.last_print = time.monotonic()

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        if self.step is None or not self.step[1]:
            return f"{self.label}, {_clock(elapsed)} elapsed"
        done, total = self.step
        left = f", ~{_clock(elapsed / done * (total - done))} left" if 0 < done < total else ""
        return f"{done}/{total} ({100 * done / total:.0f}%), {_clock(elapsed)} elapsed{left}: {self.label}"

    def __call__(self, done: int, total: int, label: str) -> None:
        self.step, self.label = (done, total), label
        if time.monotonic() - self.last_print >= self.interval:
            self._emit(self._line())

    def update(self, label: str, fraction: float) -> None:
        """Fraction-based progress (the profiler's callback)."""
        self(round(fraction * 1000), 1000, label)

    def phase(self, text: str) -> None:
        """Say what starts now (printed under the same once-per-interval rule)."""
        self.step, self.label = None, text
        if time.monotonic() - self.last_print >= self.interval:
            self._emit(self._line())

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval):
            if time.monotonic() - self.last_print >= 2 * self.interval:
                self._emit(f"still working: {self._line()}")

    def __enter__(self) -> ProgressLines:
        if self.interval > 0:  # interval 0 (tests): every update prints, no heartbeat needed
            self._thread = threading.Thread(target=self._heartbeat, name="prunec-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


def stderr_is_terminal() -> bool:
    """True when progress bars can be drawn (stderr is a terminal)."""
    return Console(stderr=True).is_terminal
