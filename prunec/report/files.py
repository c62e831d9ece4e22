"""Atomic writes for every report file, so a crash never leaves half a report behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from prunec.errors import OptionError
from prunec.graph.io import check_new_file, file_mode


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temp file beside `path`, then rename it over `path`."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, file_mode(p))  # not mkstemp's private 0600
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Text version of write_bytes_atomic (UTF-8)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Fail fast (before any work) if a report file cannot be created at `path`."""
    return check_new_file(path, f"{flag} {Path(path)}", OptionError)
