"""Atomic file publishing: write a hidden temporary file next to the target, then ``os.replace`` it.

Readers (other threads, other processes, other machines on a shared volume) see the old file or the new one,
never half of one. Every file the product writes more than once goes through :func:`atomic_write`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename into it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], mode: int | None = None, durable: bool = False) -> Path:
    """Publish ``path`` whole: ``write`` fills a temporary file in the same directory, which replaces ``path``.

    Args:
        path: the file to (re)place; its directory is created.
        write: called with the temporary file opened for binary writing.
        mode: file permissions (e.g. ``0o600`` for a file holding a token); default the umask's.
        durable: fsync the file and the directory (model versions), not only replace it.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            write(out)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None, durable: bool = False) -> Path:
    """Publish ``data`` as ``path`` (see :func:`atomic_write`)."""
    return atomic_write(path, lambda out: out.write(data), mode, durable)


def atomic_write_text(path: Path, text: str, mode: int | None = None, durable: bool = False) -> Path:
    """Publish ``text`` (UTF-8) as ``path`` (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode, durable)


def atomic_write_json(path: Path, data: Any, mode: int | None = None, indent: int | None = None,
                      durable: bool = False) -> Path:
    """Publish ``data`` as JSON (see :func:`atomic_write`)."""
    return atomic_write_text(path, json.dumps(data, indent=indent), mode, durable)
