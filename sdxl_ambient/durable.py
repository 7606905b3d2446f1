"""Writes that survive a crash: a file is written beside its place, flushed, renamed over it,
and the folder flushed, so a reader sees the old file or the new one, never half of one; and
which errors are the disk refusing a write (:func:`write_failure`), as the libraries that write
our files report them (``outputs.disk_errors`` makes those one line in every command)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable
from pathlib import Path

# A write the disk refused, as the libraries that write our files report it.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
_OS_ERROR = (re.compile(r"I/O error: (.+?) \(os error (\d+)\)"),  # safetensors (its message)
             re.compile(r"IoError\(Os \{ code: (\d+), kind: \w+, message: \"(.+?)\""))  # safetensors (debug form)
_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed")  # torch's zip writer
TEMPORARY = ".*.tmp-*"  # the name of a file that atomic_write is writing (left behind only by a kill -9)


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


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` (before it is renamed into place)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            fsync_file(path)
    for path in [p for p in Path(folder).rglob("*") if p.is_dir()] + [Path(folder)]:
        fsync_dir(path)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp_path)``, then flush it and rename it over ``path``; a failed write leaves the old
    file (or none) and no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, when ``exc`` is the disk refusing it (full, over quota, over the file
    size limit, read-only, an I/O error); None for any other error."""
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        return os.strerror(exc.errno)
    text = str(exc)
    for pattern in _OS_ERROR:
        found = pattern.search(text)
        if found:
            code, reason = (found.group(2), found.group(1)) if pattern is _OS_ERROR[0] else found.groups()
            if int(code) in _WRITE_ERRNOS:
                return reason
    if isinstance(exc, RuntimeError) and any(marker in text for marker in _SHORT_WRITE):
        return "a write was cut short (no space left, or over a size limit)"
    return None

