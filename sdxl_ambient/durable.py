"""Writes that survive a crash: a file is written beside its place, flushed, renamed over it,
and the folder flushed, so a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

# What a write that the disk refused looks like in the libraries that write our files.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
_WRITE_MESSAGES = ("unexpected pos", "PytorchStreamWriter failed", "I/O error", "No space left", "File too large")


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename in it is durable only after this)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp_path)``, then flush it and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, when ``exc`` is the disk refusing it (full, over quota, read-only, an I/O
    error); None for any other error. torch's zip writer reports a short write only as
    ``unexpected pos N vs M``, safetensors as ``I/O error: ...``."""
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        return os.strerror(exc.errno)
    text = str(exc)
    if isinstance(exc, (RuntimeError, OSError)) or type(exc).__name__ == "SafetensorError":
        if any(message in text for message in _WRITE_MESSAGES):
            return f"the disk refused a write ({text.splitlines()[0][:160]})"
    return None
