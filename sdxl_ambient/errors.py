"""Expected user errors: one line that names the flag or file and says what to do.

Library code raises :class:`UserError` for anything the user can fix (a bad flag, a missing or
broken file, a folder in the way); the command entry points print it as one line and exit with
status 2. Every other exception is a bug and keeps its traceback. Ctrl-C outside training's own
handling is one line and exit status 130.

Under ``accelerate launch`` the launcher adds its own traceback after a failed training process
unless it is given ``--quiet``; with several processes, the line is also written to the error file
torch's launcher reads (``TORCHELASTIC_ERROR_FILE``), so its failure summary shows it as the cause.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable


class UserError(ValueError):
    """A mistake in what the user gave; the message names the flag or file and what to do. It is
    always one line: any line breaks in it (a library's message quoted in it) become spaces."""

    def __init__(self, message: object = ""):
        super().__init__(" ".join(str(message).split()))


class ReportedElsewhere(UserError):
    """A :class:`UserError` that the main process found and prints; another process exits with it quietly."""


EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def _tell_the_launcher(line: str) -> None:
    """The line as the cause in torch elastic's failure summary (``accelerate launch`` with several processes)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as fh:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, fh)
    except OSError:
        pass


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (with its type when it has none), to quote in a :class:`UserError`."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def exit_code_of(main: Callable[[], int | None]) -> int:
    """Run a command's main; a :class:`UserError` becomes one line on stderr and exit status 2, a
    Ctrl-C one line and 130."""
    try:
        return main() or 0
    except UserError as err:
        line, code, shown = f"error: {err}", EXIT_USER_ERROR, not isinstance(err, ReportedElsewhere)
    except KeyboardInterrupt as interrupt:
        line, code, shown = f"interrupted: {interrupt}" if str(interrupt) else "interrupted (Ctrl-C)", EXIT_INTERRUPTED, True
    sys.stdout.flush()
    if shown:
        print(line, file=sys.stderr, flush=True)
    _tell_the_launcher(line)
    return code
