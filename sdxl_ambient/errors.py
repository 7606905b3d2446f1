"""Expected user errors: one line that names the flag or file and says what to do.

Library code raises :class:`UserError` for anything the user can fix (a bad flag, a missing or
broken file, a folder in the way); the command entry points print it as one line and exit with
status 2. Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(ValueError):
    """A mistake in what the user gave; the message names the flag or file and what to do."""


EXIT_USER_ERROR = 2


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (with its type when it has none), to quote in a :class:`UserError`."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def exit_code_of(main: Callable[[], int | None]) -> int:
    """Run a command's main; a :class:`UserError` becomes one line on stderr and exit status 2."""
    try:
        return main() or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
