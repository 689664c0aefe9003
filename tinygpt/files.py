"""Small file helpers: atomic writes (temp file + rename) and format checks of JSON descriptions."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` so readers see either the old file or the whole new one.

    The text goes to a temporary file in the same folder (so the final rename never crosses a
    file system), is flushed to disk, and then replaces `path` with `os.replace`, which is atomic.
    A crash half-way leaves the old file intact instead of a truncated vocabulary.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def check_format(d: dict, fmt: str, version: int, what: str) -> None:
    """Raise ValueError unless the JSON description `d` says it is `fmt` at `version`."""
    if d.get("format") != fmt or d.get("version") != version:
        raise ValueError(f"not a {what} description: format {d.get('format')!r} version "
                         f"{d.get('version')!r}, expected {fmt!r} version {version}")
