"""One exception type for bad user input, so the CLI can print one line and exit non-zero."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input that the user must fix: a malformed list, a missing image, an unknown name.

    The message is one line and, where a file is at fault, starts with ``file:line:``.
    """


def at(path: str | Path, line: int | None, message: str) -> InputError:
    """Build an :class:`InputError` whose message names the file (and line, when known)."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return InputError(f"{where}: {message}")
