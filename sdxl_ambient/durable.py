"""Writes that survive a crash: a file is written beside its place, flushed, renamed over it,
and the folder flushed, so a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path

# A write the disk refused, as the libraries that write our files report it.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
_OS_ERROR = re.compile(r"I/O error: (.+?) \(os error (\d+)\)")  # safetensors
_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed")  # torch's zip writer


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
    """Why a write failed, when ``exc`` is the disk refusing it (full, over quota, over the file
    size limit, read-only, an I/O error); None for any other error."""
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        return os.strerror(exc.errno)
    text = str(exc)
    found = _OS_ERROR.search(text)
    if found and int(found.group(2)) in _WRITE_ERRNOS:
        return found.group(1)
    if isinstance(exc, RuntimeError) and any(marker in text for marker in _SHORT_WRITE):
        return "a write was cut short (no space left, or over a size limit)"
    return None
