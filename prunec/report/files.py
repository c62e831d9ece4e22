"""Atomic writes for every report file, so a crash never leaves half a report behind.

The output-path policy (regular files or new paths only, symlinks followed and kept, a probe
that the folder is writable, one-line errors for every OS error, no temp file left on errors or
signals) is graph.io's, shared with the model writer.
"""

from __future__ import annotations

import os
from pathlib import Path

from prunec.errors import OutputFileError
from prunec.graph.io import atomic_write, check_new_file, check_writable_folder


def write_bytes_atomic(path: str | os.PathLike, data: bytes, label: str | None = None) -> Path:
    """Write `data` to a temp file beside `path`, then rename it over `path`."""
    p = Path(path)
    with atomic_write(p, label or str(p), OutputFileError) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return p


def write_text_atomic(path: str | os.PathLike, text: str, label: str | None = None) -> Path:
    """Text version of write_bytes_atomic (UTF-8)."""
    return write_bytes_atomic(path, text.encode("utf-8"), label)


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Fail fast (before any work) if a report file cannot be created at `path`."""
    return check_new_file(path, f"{flag} {Path(path)}", OutputFileError)


def check_output_folder(path: str | os.PathLike, flag: str) -> Path:
    """Fail fast if `path` is neither a folder nor a new path whose parent folder exists."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputFileError(f"{flag} {p}: exists and is not a folder")
    parent = p if p.is_dir() else (p.parent if str(p.parent) else Path("."))
    if not parent.is_dir():
        raise OutputFileError(f"{flag} {p}: folder {parent} does not exist")
    check_writable_folder(parent, f"{flag} {p}", OutputFileError)
    return p
