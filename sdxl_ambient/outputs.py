"""Output folders: nothing a user has is overwritten, and one run at a time per folder.

Every command checks its output folder before any work, and writes nothing until the checks pass:

* **Apart from the inputs.** The output folder may not be an input folder, lie inside one (a sample
  written into a data folder would become training data) or contain one (:func:`check_apart`).
* **Only its own files.** A command recognises what it wrote by the record ``.sdxl-ambient.json`` in
  the folder: the top-level names (or ``checkpoint-*``-like patterns) each command claims there,
  written before the files themselves. Anything else in the folder is the user's. Such a folder is
  refused unless ``--overwrite_output_dir`` is given, and even then a command refuses when one of
  the names it writes is taken by a file it did not write: it never touches files it did not write.
  A latent cache recognises its own files by name instead (``recognise_by_name``), so that the
  shareable output of ``corrupt`` carries no record.
* **Earlier results only when asked.** A command's own earlier results are replaced only with
  ``--overwrite_output_dir``; they are removed first, so nothing of the earlier run is left beside
  the new one, and the removal is logged.
* **One run per folder.** :meth:`OutputFolder.locked` holds an ``flock`` on ``.sdxl-ambient.lock``
  for the command's life; a second command on the same folder is refused, naming the holder's PID.
  The kernel releases the lock when its process dies, so a killed run (kill -9) never blocks the
  next one. A folder the command created is removed again if it is still empty when the command
  fails, so a failed start leaves nothing behind.
* **A full disk is one line.** A write the disk refuses while the lock is held (full, over quota,
  read-only) is a one-line error naming the file, or else the folder, and exit status 2.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from sdxl_ambient.durable import atomic_write, write_failure
from sdxl_ambient.errors import UserError
from sdxl_ambient.files import LOCK_FILE, OUTPUT_RECORD

logger = logging.getLogger(__name__)

OVERWRITE_FLAG = "--overwrite_output_dir"


def _relation(output: Path, given: Path) -> str | None:
    """How an output folder overlaps an input path: "is", "is inside", "contains", or None."""
    if output == given:
        return "is"
    if output.is_relative_to(given):
        return "is inside"
    if given.is_relative_to(output):
        return "contains"
    return None


def check_apart(flag: str, folder, inputs: Iterable[tuple[str, object]]) -> None:
    """Refuse an output folder that is, lies inside, or contains one of the ``(flag, path)`` inputs.
    Inputs that are not local paths (a Hub id, None) are skipped."""
    out = Path(folder).expanduser().resolve()
    for input_flag, value in inputs:
        if not value or not Path(str(value)).expanduser().exists():
            continue
        relation = _relation(out, Path(str(value)).expanduser().resolve())
        if relation:
            raise UserError(f"{flag} {folder} {relation} {input_flag} {value}: outputs go to a folder apart from "
                            f"the inputs (nothing there may be replaced, and a sample in a data folder becomes "
                            f"training data); choose another {flag}")


def _free_space(path: Path) -> str:
    for place in (path, *path.parents):
        if place.exists():
            return f"{shutil.disk_usage(place).free / 2**20:.0f} MiB free there"
    return "free space unknown"


@contextlib.contextmanager
def disk_errors(folder, then: str = "run the same command again") -> Iterator[None]:
    """A write in the block that the disk refuses (:func:`durable.write_failure`: full, over quota,
    read-only, ...) becomes one :class:`UserError` naming the file (when the error names it) or
    ``folder``, and what to do (free some space, then ``then``). Every command's writes run under
    it: :meth:`OutputFolder.locked` holds it for the lock's folder."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        reason = write_failure(exc)
        if reason is None:
            raise
        where = Path(getattr(exc, "filename", None) or folder)
        raise UserError(f"could not write {where}: {reason} ({_free_space(where)}): free some space, "
                        f"then {then}") from None


class OutputFolder:
    """A command's output folder: the names it writes (glob patterns allowed), the record of what
    it wrote, the checks before work, and the lock.

    ``command`` names the writer in the record and in messages. With ``recognise_by_name`` every
    entry matching ``writes`` counts as the command's own (a latent cache's distinctive names)."""

    def __init__(self, path, *, command: str, writes: Iterable[str], flag: str = "--output_dir",
                 recognise_by_name: bool = False):
        self.path, self.command, self.flag = Path(path), command, flag
        self.writes, self.recognise_by_name = tuple(writes), recognise_by_name

    # ----------------------------------------------------------------- what is there

    def record(self) -> dict[str, str]:
        """{name or pattern: command} of what sdxl-ambient commands wrote here."""
        path = self.path / OUTPUT_RECORD
        if not path.is_file():
            return {}
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{path} is damaged: delete it only if the folder holds nothing of yours") from None
        return dict(record.get("written_by", {}))

    def entries(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name not in (OUTPUT_RECORD, LOCK_FILE))

    def _matches(self, name: str, patterns: Iterable[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

    def own(self) -> list[str]:
        """The entries this command wrote here."""
        if self.recognise_by_name:
            return [n for n in self.entries() if self._matches(n, self.writes)]
        mine = [pattern for pattern, command in self.record().items() if command == self.command]
        return [n for n in self.entries() if self._matches(n, mine)]

    def foreign(self) -> list[str]:
        """The entries this command did not write: the user's, or another command's."""
        own = set(self.own())
        return [n for n in self.entries() if n not in own]

    # ----------------------------------------------------------------- checks before work

    def check_foreign(self, overwrite: bool, overwrite_flag: str | None = OVERWRITE_FLAG) -> None:
        """Refuse files this command did not write: always where it would write one of its own
        names, otherwise unless ``overwrite`` (they are then left as they are)."""
        foreign = self.foreign()
        in_the_way = [n for n in foreign if self._matches(n, self.writes)]
        if in_the_way:
            raise UserError(f"{self.flag} {self.path} holds {', '.join(in_the_way[:5])}, which sdxl-ambient "
                            f"{self.command} did not write and would replace: move it away or choose another {self.flag}")
        if foreign and not overwrite:
            allow = (f", or pass {overwrite_flag} to write beside them (they are never touched)"
                     if overwrite_flag else "")
            raise UserError(f"{self.flag} {self.path} holds files sdxl-ambient {self.command} did not write "
                            f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}): choose a new or empty "
                            f"folder{allow}")

    def check_own(self, overwrite: bool) -> None:
        """Refuse to replace this command's earlier results unless ``overwrite``."""
        own = self.own()
        if own and not overwrite:
            raise UserError(f"{self.flag} {self.path} holds the results of an earlier sdxl-ambient {self.command} "
                            f"({', '.join(own[:5])}): pass {OVERWRITE_FLAG} to replace them, or choose another folder")

    @contextlib.contextmanager
    def checked_and_locked(self, inputs: Iterable[tuple[str, object]], overwrite: bool) -> Iterator[OutputFolder]:
        """A command that replaces its results only when asked: apart from its inputs (checked
        before the lock file is made), then, under the lock, no files of others and no earlier
        results unless ``overwrite``. A full disk then says to rerun with the flag (the partial
        results are the command's own)."""
        check_apart(self.flag, self.path, inputs)
        with self.locked(), disk_errors(self.path, then=f"run the same command again with {OVERWRITE_FLAG}"):
            self.check_foreign(overwrite)
            self.check_own(overwrite)
            yield self

    # ----------------------------------------------------------------- writing

    def start(self, clear: Iterable[str] = (), extra: Iterable[str] = ()) -> list[str]:
        """Remove ``clear`` (entries this command wrote before), then record the names this command
        writes (``writes`` and ``extra``) before it writes them. Returns what was removed."""
        own = set(self.own())
        removed = [name for name in clear if name in own]
        for name in removed:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        if removed:
            logger.warning("%s: removed %s of an earlier sdxl-ambient %s from %s", OVERWRITE_FLAG,
                           ", ".join(removed), self.command, self.path)
        if not self.recognise_by_name:
            record = self.record()
            record.update({name: self.command for name in (*self.writes, *extra)})
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path / OUTPUT_RECORD,
                         lambda p: p.write_text(json.dumps({"written_by": record}, indent=1, sort_keys=True)))
        return removed

    @contextlib.contextmanager
    def locked(self) -> Iterator[OutputFolder]:
        """Hold the folder's lock (creating the folder) for the block; the folders created here and
        still empty when the block fails are removed again. A write the disk refuses in the block
        is one line naming the file, or else this folder (:func:`disk_errors`)."""
        created = [p for p in (self.path, *self.path.parents) if not p.exists()]  # the folders mkdir makes
        lock = FolderLock(self.path, self.flag)
        lock.acquire()
        failed = True
        try:
            with disk_errors(self.path):
                yield self
            failed = False
        finally:
            lock.release()
            for folder in created if failed else []:
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()


class FolderLock:
    """An exclusive ``flock`` on ``FOLDER/.sdxl-ambient.lock`` holding the holder's PID."""

    def __init__(self, folder, flag: str):
        self.folder, self.flag = Path(folder), flag
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(f"{self.flag} {self.folder} is in use by another run (PID {self._holder()}): "
                                "wait for it to end or stop it; one run at a time per folder") from None
            # the previous holder removes the file when it ends: make sure ours is the one at the path
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None
